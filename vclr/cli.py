"""The `vclr` command line: `vclr <group> <command> ...`.

Every subcommand lives in its own module, which defines `configure_parser(parser)` and
`main(args) -> int`. Modules are imported only when their command runs, so `vclr --help` and the
workflow's dry runs stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vclr.errors import VclrError

# (group, command) -> (module, one-line help). Explicit, so that the CLI is readable in one place.
COMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("data", "download"): ("vclr.data.download", "fetch a dataset's official files, verify, unpack"),
    ("data", "generate"): ("vclr.data.synthetic", "write a small synthetic dataset in the real formats"),
    ("data", "extract"): ("vclr.data.extract", "decode videos into packed JPEG frame shards"),
    ("data", "index"): ("vclr.data.index", "parse official annotations into split CSVs + summary.json"),
    ("pipeline", "dvc"): ("vclr.pipeline", "write dvc.yaml from the experiment matrix"),
    ("pipeline", "jobs"): ("vclr.pipeline", "list the jobs of the experiment matrix"),
    ("pipeline", "restore-times"): ("vclr.pipeline", "after dvc pull: file times from content, so Snakemake reruns nothing finished"),
    ("bench", "extract"): ("vclr.bench.extract", "extraction frames/s against the ffmpeg command line"),
    ("bench", "reads"): ("vclr.bench.reads", "random frame reads: packed shards against loose JPEGs"),
    ("bench", "filecount"): ("vclr.bench.filecount", "files DVC would track for the paper's K400 layout"),
    ("bench", "retrieval"): ("vclr.bench.retrieval", "UCF101-sized retrieval vs scikit-learn; linear-probe cost"),
    ("bench", "pretrain"): ("vclr.bench.pretrain", "videos/s of the VCLR training step per mode"),
    ("bench", "input"): ("vclr.bench.input", "input pipeline frames/s: CPU reference chain vs batched augmentation (CPU, CUDA + nvjpeg)"),
    ("bench", "features"): ("vclr.bench.features", "feature-extraction videos/s: backbone, batched path, packed JPEGs"),
    ("train", "pretrain"): ("vclr.train.pretrain", "VCLR pretraining (resumable)"),
    ("train", "moco-standin"): ("vclr.train.moco_standin",
                                "a MoCo v2-layout init trained by instance discrimination (profiles without ImageNet weights)"),
    ("eval", "features"): ("vclr.evaluate.features", "frozen-backbone video features (30 frames, centre crop)"),
    ("eval", "linear-probe"): ("vclr.evaluate.linear_probe", "linear SVM (liblinear primal, C=1) on frozen features"),
    ("eval", "retrieval"): ("vclr.evaluate.retrieval", "nearest-neighbour retrieval R@k: test queries, train gallery"),
    ("eval", "finetune"): ("vclr.train.finetune", "TSN/TSM fine-tuning with the published protocol, then the multi-view test"),
    ("eval", "localize"): ("vclr.evaluate.localization", "BMN temporal action proposals on ActivityNet: AR@AN and AUC"),
    ("eval", "convert"): ("vclr.models.convert", "the authors' released VCLR weights -> our backbone.pt"),
    ("report", "build"): ("vclr.report.build", "tables (md, csv, tex), figures and provenance README of a profile"),
}


def build_parser(load_modules: bool = True, only: tuple[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vclr", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    group_parsers: dict[str, argparse._SubParsersAction] = {}
    for (group, command), (module_name, help_text) in COMMANDS.items():
        if group not in group_parsers:
            group_parsers[group] = groups.add_parser(group, help=f"{group} commands").add_subparsers(
                dest="command", metavar="COMMAND", required=True
            )
        sub = group_parsers[group].add_parser(command, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if load_modules and (only is None or only == (group, command)):
            importlib.import_module(module_name).configure_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the command asked for (two leading words), unless asking for help.
    only = tuple(argv[:2]) if len(argv) >= 2 and (argv[0], argv[1]) in COMMANDS else None
    parser = build_parser(load_modules=only is not None, only=only)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except VclrError as error:
        print(f"vclr {args.group} {args.command}: error: {error}", file=sys.stderr)
        return 2
