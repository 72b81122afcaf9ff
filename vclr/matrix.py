"""The experiment matrix: one config expanded into the list of jobs.

Both executors are generated from this list: the Snakefile defines one rule per job and
`vclr pipeline dvc` writes one DVC stage per job, each running the SAME `vclr ...` command, so
`snakemake all_tables` and `dvc repro` build the same files.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from vclr.data import DATASETS

# Source files whose change must rerun a stage (DVC hashes them; Snakemake sees them as inputs).
CODE = {
    "download": ("vclr/data/download.py", "vclr/data/sources.yaml"),
    "generate": ("vclr/data/synthetic.py",),
    "extract": ("vclr/data/extract.py", "vclr/data/packed.py"),
    "index": ("vclr/data/index.py", "vclr/data/annotations.py"),
    "pretrain": (
        "vclr/train/pretrain.py", "vclr/train/losses.py", "vclr/train/schedule.py",
        "vclr/train/checkpoint.py", "vclr/models/vclr.py", "vclr/models/backbones.py",
        "vclr/data/pretrain_dataset.py", "vclr/data/sampling.py", "vclr/data/augment.py",
        "vclr/data/batch_augment.py",
    ),
}

# Pretraining settings passed as `vclr train pretrain` flags (the rest of a run's entry says what
# data it reads and how it is launched).
PRETRAIN_FLAGS = (
    "backbone", "epochs", "batch_size", "lr", "warmup_epochs", "queue_size", "crop", "segments",
    "temperature", "losses", "workers", "checkpoint_every", "init", "bf16", "channels_last",
    "compile", "deterministic", "augment",
)


@dataclass(frozen=True)
class Job:
    """One step of the pipeline: a CLI command with the files it reads and writes."""

    name: str
    stage: str
    argv: tuple[str, ...]
    deps: tuple[str, ...]
    out_dirs: tuple[str, ...] = ()
    out_files: tuple[str, ...] = ()
    # Outputs a rerun must NOT delete (a resumable checkpoint, its log): DVC keeps them with
    # `persist: true`; Snakemake, which deletes every declared output first, is not told of them.
    persist_files: tuple[str, ...] = ()
    params: tuple[str, ...] = ()  # dotted config keys the job's flags come from
    log: str = ""
    threads: int = 1
    resources: dict = field(default_factory=dict)

    @property
    def shell(self) -> str:
        return shlex.join(self.argv)

    @property
    def outs(self) -> tuple[str, ...]:
        return self.out_dirs + self.out_files


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _data_paths(config: dict, dataset: str) -> dict[str, str]:
    root = PurePosixPath(config["paths"]["data"])
    return {
        "raw": str(root / "raw" / dataset),
        # archives and hand-placed files: outside raw/, which a rerun of its stage deletes
        "downloads": str(root / "downloads" / dataset),
        "frames": str(root / "frames" / dataset),
        # an unfinished extraction's state: outside frames/, which a rerun of its stage deletes
        "extract_work": str(root / "work" / "extract" / dataset),
        "index": str(root / "index" / dataset),
    }


def _log(config: dict, name: str) -> str:
    return str(PurePosixPath(config["paths"]["logs"]) / f"{name}.log")


def data_jobs(config: dict, dataset: str) -> list[Job]:
    """Source (download or generate) -> extract -> index for one dataset."""
    settings = config["datasets"][dataset]
    paths = _data_paths(config, dataset)
    key = f"datasets.{dataset}"
    jobs = []
    if settings["source"] == "synthetic":
        argv = ["vclr", "data", "generate", "--dataset", dataset, "--out", paths["raw"],
                "--seed", str(config["seed"])]
        for name, value in settings["synthetic"].items():
            argv += [_flag(name), str(value)]
        jobs.append(Job(f"generate_{dataset}", "generate", tuple(argv), CODE["generate"],
                        out_dirs=(paths["raw"],), params=(f"{key}.synthetic", "seed"),
                        log=_log(config, f"generate_{dataset}")))
    else:
        argv = ["vclr", "data", "download", "--dataset", dataset, "--out", paths["raw"],
                "--downloads", paths["downloads"]]
        jobs.append(Job(f"download_{dataset}", "download", tuple(argv), CODE["download"],
                        out_dirs=(paths["raw"],), params=(f"{key}.source",),
                        log=_log(config, f"download_{dataset}"),
                        resources={"runtime": 24 * 60, "mem_mb": 4000}))

    extract = settings["extract"]
    argv = ["vclr", "data", "extract", "--dataset", dataset,
            "--videos", f"{paths['raw']}/videos", "--out", paths["frames"]]
    if extract.get("fps") is not None:
        argv += ["--fps", str(extract["fps"])]
    if "size" in extract:
        argv += ["--size", "{}x{}".format(*extract["size"])]
    else:
        argv += ["--short-side", str(extract["short_side"])]
    if extract.get("num_frames") is not None:
        argv += ["--num-frames", str(extract["num_frames"])]
    argv += ["--quality", str(extract["quality"]), "--shards", str(extract["shards"]),
             "--workers", str(config["workers"]), "--work", paths["extract_work"]]
    jobs.append(Job(f"extract_{dataset}", "extract", tuple(argv),
                    (paths["raw"],) + CODE["extract"], out_dirs=(paths["frames"],),
                    params=(f"{key}.extract", "workers"), log=_log(config, f"extract_{dataset}"),
                    threads=config["workers"],
                    resources={"runtime": 12 * 60, "mem_mb": 2000 * config["workers"]}))

    argv = ["vclr", "data", "index", "--dataset", dataset,
            "--annotations", f"{paths['raw']}/annotations", "--frames", paths["frames"],
            "--out", paths["index"]]
    if "split" in settings:
        argv[-2:-2] = ["--split", str(settings["split"])]
    jobs.append(Job(f"index_{dataset}", "index", tuple(argv),
                    (paths["raw"], paths["frames"]) + CODE["index"], out_dirs=(paths["index"],),
                    params=(f"{key}.split",) if "split" in settings else (),
                    log=_log(config, f"index_{dataset}")))
    return jobs


def _launcher(processes: int) -> list[str]:
    if processes <= 1:
        return ["vclr"]
    return ["torchrun", "--standalone", f"--nproc_per_node={processes}", "-m", "vclr"]


MOCO_V2_FILE = "moco_v2_200ep_pretrain.pth.tar"


def moco_v2_job(config: dict) -> Job:
    """The paper's initialisation, fetched and verified like a dataset (vclr/data/sources.yaml)."""
    root = PurePosixPath(config["paths"]["data"])
    out, downloads = str(root / "weights" / "moco_v2"), str(root / "downloads" / "moco_v2")
    argv = ("vclr", "data", "download", "--dataset", "moco_v2", "--out", out, "--downloads", downloads)
    return Job("download_moco_v2", "download", argv, CODE["download"], out_dirs=(out,),
               log=_log(config, "download_moco_v2"))


def pretrain_jobs(config: dict) -> list[Job]:
    """One `vclr train pretrain` job per configured run (runs override the defaults), plus the
    download of the MoCo v2 weights when a run starts from them (`init: moco_v2`)."""
    section = config.get("pretrain")
    if not section:
        return []
    moco = moco_v2_job(config)
    jobs = []
    for run, overrides in section["runs"].items():
        settings = {**section["defaults"], **overrides}
        init_deps: tuple[str, ...] = ()
        if settings.get("init") == "moco_v2":
            if moco not in jobs:
                jobs.insert(0, moco)
            init_deps = moco.out_dirs
            settings["init"] = f"moco_v2:{moco.out_dirs[0]}/weights/{MOCO_V2_FILE}"
        paths = _data_paths(config, settings["dataset"])
        out = str(PurePosixPath(config["paths"]["results"]) / "checkpoints" / run)
        processes = settings.get("nproc_per_node", 1)
        argv = _launcher(processes) + [
            "train", "pretrain", "--index", f"{paths['index']}/{settings.get('split', 'train')}.csv",
            "--frames", paths["frames"], "--out", out, "--seed", str(config["seed"]),
        ]
        for name in PRETRAIN_FLAGS:
            value = settings.get(name)
            if isinstance(value, bool):
                argv += [_flag(name)] if value else []
            elif isinstance(value, list):
                argv += [_flag(name), ",".join(value)]
            elif value is not None:
                argv += [_flag(name), str(value)]
        jobs.append(Job(
            f"pretrain_{run}", "pretrain", tuple(argv),
            (paths["index"], paths["frames"]) + init_deps + CODE["pretrain"],
            out_files=(f"{out}/backbone.pt", f"{out}/summary.json"),
            persist_files=(f"{out}/checkpoint_last.pt", f"{out}/log.jsonl"),
            params=("pretrain.defaults", f"pretrain.runs.{run}", "seed"),
            log=_log(config, f"pretrain_{run}"), threads=max(1, settings.get("workers", 0)),
            resources={"gpu": processes, "runtime": 72 * 60, "mem_mb": 64000} if processes > 1 else {},
        ))
    return jobs


def expand_jobs(config: dict) -> list[Job]:
    """Every job of the profile, in dependency order."""
    jobs: list[Job] = []
    for dataset in DATASETS:
        if dataset in config["datasets"]:
            jobs += data_jobs(config, dataset)
    jobs += pretrain_jobs(config)
    names = [job.name for job in jobs]
    assert len(names) == len(set(names)), f"duplicate job names in the matrix: {names}"
    return jobs


def final_targets(jobs: list[Job]) -> list[str]:
    """Outputs no other job reads: what `all_tables` asks for."""
    consumed = {dep for job in jobs for dep in job.deps}
    return [out for job in jobs for out in job.outs if out not in consumed]


def dvc_stages(jobs: list[Job], config_path: str, wdir: str = ".") -> dict:
    """The `stages:` mapping of a dvc.yaml (paths relative to `wdir`, the repository root)."""
    stages = {}
    for job in jobs:
        stage: dict = {"cmd": job.shell}
        if wdir != ".":
            stage["wdir"] = wdir
        stage["deps"] = list(job.deps)
        if job.params:
            stage["params"] = [{config_path: list(job.params)}]
        stage["outs"] = list(job.outs) + [{path: {"persist": True}} for path in job.persist_files]
        stages[job.name] = stage
    return {"stages": stages}


def relative_wdir(dvc_yaml_path: str) -> str:
    """The repository root as seen from the folder of a dvc.yaml (for its stages' `wdir`)."""
    folder = os.path.dirname(os.path.normpath(dvc_yaml_path)) or "."
    return os.path.relpath(".", folder).replace(os.sep, "/")
