"""The experiment matrix: one config expanded into the list of jobs.

Both executors are generated from this list: the Snakefile defines one rule per job and
`vclr pipeline dvc` writes one DVC stage per job, each running the SAME `vclr ...` command, so
`snakemake all_tables` and `dvc repro` build the same files.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

from vclr.data import DATASETS
from vclr.errors import VclrError

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
        "vclr/data/batch_augment.py", "vclr/data/device_prefetch.py", "vclr/models/video3d.py",
    ),
    "features": ("vclr/evaluate/features.py", "vclr/evaluate/feature_files.py", "vclr/data/frames.py", "vclr/data/packed.py",
                 "vclr/data/batch_augment.py", "vclr/data/device_prefetch.py", "vclr/models/backbones.py",
                 "vclr/models/video3d.py"),
    # the metrics record is every evaluation's output format
    "retrieval": ("vclr/evaluate/retrieval.py", "vclr/evaluate/feature_files.py", "vclr/evaluate/record.py"),
    "linear_probe": ("vclr/evaluate/linear_probe.py", "vclr/evaluate/feature_files.py", "vclr/evaluate/record.py"),
    "finetune": (
        "vclr/train/finetune.py", "vclr/data/finetune_dataset.py", "vclr/data/sampling.py",
        "vclr/models/tsn.py", "vclr/models/backbones.py", "vclr/models/video3d.py", "vclr/evaluate/record.py",
    ),
    "localize": (
        "vclr/evaluate/localization.py", "vclr/evaluate/proposals.py", "vclr/models/bmn.py",
        "vclr/models/tsn.py", "vclr/data/anet_blocked_videos.txt", "vclr/evaluate/record.py",
    ),
    "report": (
        "vclr/report/build.py", "vclr/report/collect.py", "vclr/report/tables.py",
        "vclr/report/figures.py", "vclr/report/published.py", "vclr/report/published_results.csv",
        "vclr/report/paper_ablations.csv",
    ),
}

# Pretraining settings passed as `vclr train pretrain` flags (the rest of a run's entry says what
# data it reads and how it is launched).
PRETRAIN_FLAGS = (
    "backbone", "epochs", "batch_size", "lr", "warmup_epochs", "queue_size", "crop", "segments",
    "temperature", "alpha", "losses", "workers", "checkpoint_every", "init", "bf16", "channels_last",
    "compile", "deterministic", "augment", "clip_frames", "clip_stride", "prefetch",
)
# `vclr eval ...` flags each evaluation section of the config may set (evaluate.<section>).
FEATURES_FLAGS = ("num_frames", "crop", "batch_size", "workers")
FINETUNE_FLAGS = (
    "segments", "epochs", "batch_size", "lr", "lr_steps", "short_side", "crop", "test_frames",
    "test_views", "test_crop", "dropout", "weight_decay", "clip_grad", "workers", "test_batch_size",
    "checkpoint_every", "fp32", "channels_last", "deterministic",
)
LOCALIZE_FLAGS = (
    "train_split", "eval_split", "interval", "short_side", "crop", "temporal_scale",
    "position_samples", "num_samples", "samples_per_bin", "boundary_ratio", "hidden", "epochs",
    "batch_size", "lr", "weight_decay", "lr_step", "soft_nms_alpha", "soft_nms_low", "soft_nms_high",
    "top_k", "workers", "frame_batch",
)
RANDOM = "random"  # the evaluated backbone name of the seeded random initialisation
CLIP_FLAGS = ("clip_frames", "clip_stride")  # a 3D backbone's segment clip: every evaluation of it passes them
FEATURE_TASKS = ("retrieval", "linear_probe")  # the evaluations on frozen features (ablations pick from these)
RETRIEVAL_SPLITS = ("train", "test")  # gallery, queries (spec/protocols.md)
LOCALIZE_CLASSIFIER = "anet_tsn"  # the fine-tuning run whose snippet scores BMN reads
RECORD_PARAMS = ("seed", "profile")  # config keys of the flags every metrics record gets (_record_flags)


@dataclass(frozen=True)
class Job:
    """One step of the pipeline: a CLI command with the files it reads and writes."""

    name: str
    stage: str
    argv: tuple[str, ...]
    deps: tuple[str, ...]
    out_dirs: tuple[str, ...] = ()
    out_files: tuple[str, ...] = ()
    # Metrics records: small, committed to git (DVC `metrics` with `cache: false`).
    metrics_files: tuple[str, ...] = ()
    # Outputs a rerun must NOT delete (a resumable checkpoint, its log): DVC keeps them with
    # `persist: true`; Snakemake, which deletes every declared output first, is not told of them.
    persist_files: tuple[str, ...] = ()
    params: tuple[str, ...] = ()  # dotted config keys the job's flags come from
    log: str = ""
    threads: int = 1
    resources: dict = field(default_factory=dict)
    # Snakemake starts ready jobs of higher priority first: the long pretraining runs, so the
    # longest chain (data -> the costliest run -> its evaluations) does not wait behind short jobs.
    priority: int = 0
    # What the report needs to place the job's outputs in a table (run, seed, ablation, ...).
    meta: dict = field(default_factory=dict)
    # Outputs kept in git, not in DVC's cache (the generated tables): DVC `cache: false`.
    committed_dirs: tuple[str, ...] = ()

    @property
    def shell(self) -> str:
        """The command both executors run. The thread count is part of it: Snakemake sets the
        OpenMP/MKL thread variables from `threads`, DVC does not, and a CPU reduction summed by
        another number of threads rounds differently - the same command must give the same bytes."""
        threads = f"OMP_NUM_THREADS={self.threads} MKL_NUM_THREADS={self.threads}"
        return f"env {threads} {shlex.join(self.argv)}"

    @property
    def outs(self) -> tuple[str, ...]:
        return self.out_dirs + self.out_files + self.metrics_files + self.committed_dirs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flags(settings: dict, names: tuple[str, ...], spread: tuple[str, ...] = ()) -> list[str]:
    """CLI flags of the `names` set in `settings`: a true boolean is a bare flag, a false one
    nothing; a list is comma-joined, or one argument per item for the `spread` names (nargs)."""
    argv: list[str] = []
    for name in names:
        value = settings.get(name)
        if isinstance(value, bool):
            argv += [_flag(name)] if value else []
        elif isinstance(value, list):
            argv += [_flag(name)] + ([str(v) for v in value] if name in spread
                                     else [",".join(str(v) for v in value)])
        elif value is not None:
            argv += [_flag(name), str(value)]
    return argv


def _gpu_resources(gpus: int, runtime_hours: int) -> dict:
    """Snakemake resources of a job that needs `gpus` GPUs (none for a CPU job); the SLURM
    profile (workflow/profiles/slurm) maps them to a partition, nodes and CPUs."""
    return {"gpu": gpus, "runtime": runtime_hours * 60, "mem_mb": 64000} if gpus > 0 else {}


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


def _run_dir(config: dict, name: str) -> str:
    """results/<profile>/checkpoints/<name>/: a training job's resumable state and its outputs."""
    return str(PurePosixPath(config["paths"]["results"]) / "checkpoints" / name)


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
        argv += _flags(settings["synthetic"], tuple(settings["synthetic"]))
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
    """The paper's initialisation, fetched and verified like a dataset (vclr/data/sources.yaml); on
    a profile with `pretrain.moco_v2_standin` (no ImageNet weights: tiny) a stand-in in the same
    layout, trained by instance discrimination on that profile's videos (vclr/train/moco_standin.py).
    moco_v2_weights(job) is the file."""
    standin = config["pretrain"].get("moco_v2_standin")
    if standin is not None:
        settings = {**config["pretrain"]["defaults"], **standin, "losses": ["inter"], "init": "random"}
        paths = _data_paths(config, settings["dataset"])
        out = _run_dir(config, "moco_v2_standin")
        argv = ["vclr", "train", "moco-standin", "--index", f"{paths['index']}/{settings.get('split', 'train')}.csv",
                "--frames", paths["frames"], "--out", out, "--weights", f"{out}/{MOCO_V2_FILE}",
                "--seed", str(config["seed"])] + _flags(settings, PRETRAIN_FLAGS)
        return Job("pretrain_moco_v2_standin", "pretrain", tuple(argv),
                   (paths["index"], paths["frames"]) + CODE["pretrain"] + ("vclr/train/moco_standin.py",),
                   out_files=(f"{out}/{MOCO_V2_FILE}", f"{out}/backbone.pt", f"{out}/summary.json"),
                   persist_files=(f"{out}/checkpoint_last.pt", f"{out}/log.jsonl"),
                   params=("pretrain.defaults", "pretrain.moco_v2_standin", "seed"),
                   log=_log(config, "pretrain_moco_v2_standin"), threads=max(1, settings.get("workers", 0)),
                   meta={"run": "moco_v2_standin", "seed": config["seed"], "dataset": settings["dataset"],
                         "epochs": settings.get("epochs"), "log": f"{out}/log.jsonl",
                         "summary": f"{out}/summary.json", "ablation": None, "reference": False})
    root = PurePosixPath(config["paths"]["data"])
    out, downloads = str(root / "weights" / "moco_v2"), str(root / "downloads" / "moco_v2")
    argv = ("vclr", "data", "download", "--dataset", "moco_v2", "--out", out, "--downloads", downloads)
    return Job("download_moco_v2", "download", argv, CODE["download"], out_dirs=(out,),
               log=_log(config, "download_moco_v2"))


def moco_v2_weights(job: Job) -> str:
    """The MoCo v2 file moco_v2_job's job writes: the stand-in's first output, or the file the
    download puts in its directory."""
    return job.out_files[0] if job.out_files else f"{job.out_dirs[0]}/weights/{MOCO_V2_FILE}"


@dataclass(frozen=True)
class PretrainRun:
    """One pretraining job: a configured run at one seed, or an ablation of the reference run."""

    name: str  # results/<profile>/checkpoints/<name>/
    group: str  # the configured run (seeds of one run share it); tables average over a group
    seed: int
    settings: dict  # defaults + the run's overrides (+ the ablation's)
    params: tuple[str, ...]  # config keys that decide it
    ablation: dict | None = None  # {"axis", "label"} of an ablation run
    # an earlier run with the very same settings and seed: its checkpoint is reused, not retrained
    # (e.g. an epochs-axis entry that is the main run's schedule)
    same_as: str | None = None


def pretrain_runs(config: dict) -> list[PretrainRun]:
    """pretrain.runs expanded over their `seeds` (run `<name>_seed<N>`; no `seeds`: one run named
    `<name>` at the profile's seed), then the ablation grid at the profile's seed: its reference
    `<reference>_ablation` (the reference run + ablations.settings; ablation axis None) and one run
    `<reference>_<axis>_<key>` per change."""
    section = config.get("pretrain")
    if not section:
        return []
    runs = []
    for name, overrides in section["runs"].items():
        settings = {**section["defaults"], **{k: v for k, v in overrides.items() if k != "seeds"}}
        params = ("pretrain.defaults", f"pretrain.runs.{name}", "seed")
        seeds = overrides.get("seeds")
        for seed in seeds or [config["seed"]]:
            runs.append(PretrainRun(f"{name}_seed{seed}" if seeds else name, name, seed, settings, params))
    ablations = config.get("ablations")
    if ablations:
        reference = ablations["reference"]
        if reference not in section["runs"]:
            raise VclrError(f"config key 'ablations.reference': {reference!r} is not in pretrain.runs "
                            f"({', '.join(section['runs'])})")
        overrides = {k: v for k, v in section["runs"][reference].items() if k != "seeds"}
        base = {**section["defaults"], **overrides, **ablations.get("settings", {})}
        base_params = ("pretrain.defaults", f"pretrain.runs.{reference}", "ablations.settings", "seed")
        def twin(settings: dict) -> str | None:
            return next((run.name for run in runs if run.settings == settings and run.seed == config["seed"]
                         and run.same_as is None), None)

        # the grid's reference: every axis' reference row (the main run itself when `settings` is empty)
        runs.append(PretrainRun(f"{reference}_ablation", f"{reference}_ablation", config["seed"], base,
                                base_params, {"axis": None, "label": None}, same_as=twin(base)))
        for axis, entry in ablations["axes"].items():
            # an axis with its own `settings` (e.g. the main schedule for a comparison that needs it)
            # has its own reference row `<reference>_<axis>_reference`, usually a twin of a main run
            axis_base, axis_params, axis_reference = base, base_params[:-1], None
            if entry.get("settings"):
                axis_base = {**base, **entry["settings"]}
                axis_params = base_params[:-1] + (f"ablations.axes.{axis}.settings",)
                axis_reference = f"{reference}_{axis}_reference"
                runs.append(PretrainRun(axis_reference, axis_reference, config["seed"], axis_base,
                                        axis_params + ("seed",), {"axis": axis, "label": None, "reference": True},
                                        same_as=twin(axis_base)))
            for key, change in entry["runs"].items():
                name = f"{reference}_{axis}_{key}"
                settings = {**axis_base, **{k: v for k, v in change.items() if k != "label"}}
                runs.append(PretrainRun(name, name, config["seed"], settings,
                                        axis_params + (f"ablations.axes.{axis}.runs.{key}", "seed"),
                                        {"axis": axis, "label": change["label"]}, same_as=twin(settings)))
    return runs


def _pretrain_cost(settings: dict) -> int:
    """A run's relative cost for scheduling: epochs x frames per segment sample (a clip's T)."""
    return int(settings.get("epochs", 1)) * int(settings.get("clip_frames") or 1)


def pretrain_jobs(config: dict) -> list[Job]:
    """One `vclr train pretrain` job per run of pretrain_runs, plus the download of the MoCo v2
    weights when a run starts from them (`init: moco_v2`)."""
    moco = moco_v2_job(config)
    jobs = []
    for run in pretrain_runs(config):
        if run.same_as is not None:
            continue
        settings = dict(run.settings)
        init_deps: tuple[str, ...] = ()
        if settings.get("init") == "moco_v2":
            if moco not in jobs:
                jobs.insert(0, moco)
            init_deps = moco.out_files[:1] or moco.out_dirs
            settings["init"] = f"moco_v2:{moco_v2_weights(moco)}"
        paths = _data_paths(config, settings["dataset"])
        out = _run_dir(config, run.name)
        processes = settings.get("nproc_per_node", 1)
        argv = _launcher(processes) + [
            "train", "pretrain", "--index", f"{paths['index']}/{settings.get('split', 'train')}.csv",
            "--frames", paths["frames"], "--out", out, "--seed", str(run.seed),
        ] + _flags(settings, PRETRAIN_FLAGS)
        jobs.append(Job(
            f"pretrain_{run.name}", "pretrain", tuple(argv),
            (paths["index"], paths["frames"]) + init_deps + CODE["pretrain"],
            out_files=(f"{out}/backbone.pt", f"{out}/summary.json"),
            persist_files=(f"{out}/checkpoint_last.pt", f"{out}/log.jsonl"),
            params=run.params, log=_log(config, f"pretrain_{run.name}"),
            threads=max(1, settings.get("workers", 0)), priority=_pretrain_cost(settings),
            resources=_gpu_resources(processes if processes > 1 else 0, 72),
            meta={"run": run.group, "seed": run.seed, "dataset": settings["dataset"],
                  "epochs": settings.get("epochs"), "log": f"{out}/log.jsonl",
                  "summary": f"{out}/summary.json", "ablation": run.ablation,
                  "reference": run.ablation is None},
        ))
    return jobs


@dataclass(frozen=True)
class Backbone:
    """An evaluated backbone: a pretraining run's query backbone, or the seeded random init."""

    name: str  # the pretraining run (with its seed suffix), or RANDOM
    arch: str  # vclr.models.backbones name
    init: str  # the run's backbone.pt, or RANDOM (drawn from `seed`)
    deps: tuple[str, ...]  # the checkpoint file (none for RANDOM)
    params: tuple[str, ...]  # config keys that decide it (a checkpoint's are in its file)
    seed: int = 0  # the pretraining seed; the evaluations of this backbone run with it too
    meta: dict = field(default_factory=dict)  # the report's labels: run group, seed, ablation, ...
    flags: tuple[str, ...] = ()  # what every evaluation of it passes (a 3D backbone's clip)


def _backbone_of_run(config: dict, run: PretrainRun) -> Backbone:
    checkpoint = f"{_run_dir(config, run.same_as or run.name)}/backbone.pt"
    meta = {"backbone": run.name, "run": run.group, "seed": run.seed,
            "pretrain_dataset": run.settings["dataset"], "pretrain_epochs": run.settings.get("epochs"),
            "ablation": run.ablation, "reference": run.ablation is None}
    return Backbone(run.name, run.settings["backbone"], checkpoint, (checkpoint,), (), run.seed, meta,
                    tuple(_flags(run.settings, CLIP_FLAGS)))


def evaluated_backbones(config: dict) -> list[Backbone]:
    """evaluate.backbones resolved (a run with `seeds`: one backbone per seed); VclrError naming
    the key for a name that is no backbone."""
    pretrain = config.get("pretrain") or {"defaults": {}, "runs": {}}
    runs = pretrain_runs(config)
    backbones = []
    for name in config["evaluate"]["backbones"]:
        if name == RANDOM:
            if "backbone" not in pretrain["defaults"]:
                raise VclrError("config key 'evaluate.backbones': 'random' takes its architecture from "
                                "pretrain.defaults.backbone, which is not set")
            meta = {"backbone": RANDOM, "run": RANDOM, "seed": config["seed"], "pretrain_dataset": None,
                    "pretrain_epochs": None, "ablation": None, "reference": True}
            backbones.append(Backbone(RANDOM, pretrain["defaults"]["backbone"], RANDOM, (),
                                      ("pretrain.defaults.backbone", "seed"), config["seed"], meta,
                                      tuple(_flags(pretrain["defaults"], CLIP_FLAGS))))
        elif name in pretrain["runs"]:
            backbones += [_backbone_of_run(config, run) for run in runs
                          if run.group == name and run.ablation is None]
        else:
            names = ", ".join(pretrain["runs"]) or "none"
            raise VclrError(f"config key 'evaluate.backbones': {name!r} is neither a pretraining run "
                            f"(pretrain.runs: {names}) nor {RANDOM!r}")
    return backbones


def ablation_backbones(config: dict) -> list[Backbone]:
    """The ablation runs (config `ablations`), evaluated with `ablations.evaluate` only."""
    return [_backbone_of_run(config, run) for run in pretrain_runs(config) if run.ablation is not None]


def _configured_dataset(config: dict, dataset: str, key: str) -> dict[str, str]:
    if dataset not in config["datasets"]:
        raise VclrError(f"config key '{key}': dataset {dataset!r} is not in 'datasets'")
    return _data_paths(config, dataset)


def _metrics_path(config: dict, task: str, *parts: str) -> str:
    """results/<profile>/metrics/<task>/<backbone>_<dataset>[_<arch>].json (committed)."""
    return str(PurePosixPath(config["paths"]["results"]) / "metrics" / task / ("_".join(parts) + ".json"))


def _features_path(config: dict, name: str) -> str:
    """results/<profile>/features/<name>.npz (git-ignored; DVC keeps them like checkpoints)."""
    return str(PurePosixPath(config["paths"]["results"]) / "features" / f"{name}.npz")


def _record_flags(config: dict, config_path: str, seed: int) -> list[str]:
    """What a metrics record needs beyond its inputs: the profile's file (hashed), seed, profile."""
    return ["--seed", str(seed), "--profile", config["profile"], "--config", config_path]


def _features_request(config: dict, backbone: Backbone, dataset: str, split: str, key: str) -> tuple[str, ...]:
    """(index dir, split, frames dir, .npz) of one split's features, named after the backbone asking."""
    paths = _configured_dataset(config, dataset, key)
    return paths["index"], split, paths["frames"], _features_path(config, f"{backbone.name}_{dataset}_{split}")


def _features_job(config: dict, backbone: Backbone, name: str, requests: list[tuple[str, ...]]) -> Job:
    """`vclr eval features` of one or more _features_request splits in one process (the backbone
    loaded once): --index/--frames/--out for one, a --split triple each for several."""
    settings = config["evaluate"]["features"]
    argv = ["vclr", "eval", "features", "--backbone", backbone.arch, "--checkpoint", backbone.init]
    if len(requests) == 1:
        index, split, frames, out = requests[0]
        argv += ["--index", f"{index}/{split}.csv", "--frames", frames, "--out", out]
    else:
        for index, split, frames, out in requests:
            argv += ["--split", f"{index}/{split}.csv", frames, out]
    if backbone.init == RANDOM:
        argv += ["--seed", str(backbone.seed)]
    argv += list(backbone.flags) + _flags(settings, FEATURES_FLAGS)
    data = tuple(dict.fromkeys(path for index, _, frames, _ in requests for path in (index, frames)))
    return Job(f"features_{name}", "features", tuple(argv), data + backbone.deps + CODE["features"],
               out_files=tuple(out for *_, out in requests),
               params=("evaluate.features",) + backbone.params, log=_log(config, f"features_{name}"),
               threads=max(1, settings.get("workers", 0)),
               resources=_gpu_resources(settings.get("gpus", 0), 24 * len(requests)))


def features_job(config: dict, backbone: Backbone, dataset: str, split: str, key: str) -> Job:
    """Frozen-backbone features of one split (`vclr eval features`); `key` names the config entry
    that asked for them (in errors)."""
    return _features_job(config, backbone, f"{backbone.name}_{dataset}_{split}",
                         [_features_request(config, backbone, dataset, split, key)])


def _evaluation_meta(task: str, dataset: str, arch: str | None, backbone: Backbone, **inputs: str) -> dict:
    """A metrics job's place in the report: task, dataset, arch, and the backbone's labels;
    `inputs`: files the report reads beyond the record (the retrieval picture's features)."""
    return {"task": task, "dataset": dataset, "arch": arch, **backbone.meta, **inputs}


def _feature_evaluation_job(config: dict, config_path: str, task: str, backbone: Backbone, dataset: str,
                            train: Job, test: Job, flags: list[str], params: tuple[str, ...],
                            threads: int = 1) -> Job:
    """`vclr eval retrieval|linear-probe` on two features files. The record hashes the checkpoint
    and the data index the features came from, so both are deps too."""
    name = f"{task}_{backbone.name}_{dataset}"
    metrics = _metrics_path(config, task, backbone.name, dataset)
    argv = ["vclr", "eval", task.replace("_", "-"), "--train", train.out_files[0], "--test", test.out_files[0],
            "--out", metrics] + flags + _record_flags(config, config_path, backbone.seed)
    index = _data_paths(config, dataset)["index"]
    return Job(name, task, tuple(argv), (train.out_files[0], test.out_files[0], index) + backbone.deps + CODE[task],
               metrics_files=(metrics,), params=params + RECORD_PARAMS, log=_log(config, name),
               resources={"runtime": 12 * 60, "mem_mb": 32000}, threads=threads,
               meta=_evaluation_meta(task, dataset, None, backbone, gallery=train.out_files[0],
                                     queries=test.out_files[0], frames=_data_paths(config, dataset)["frames"]))


def finetune_jobs(config: dict, config_path: str, backbone: Backbone) -> list[Job]:
    """One `vclr eval finetune` per evaluate.finetune.runs entry (keyed <dataset>_<arch>: a
    protocol of spec/protocols.md; the entry and the defaults override its published settings)."""
    section = config["evaluate"]["finetune"]
    jobs = []
    for run, overrides in section["runs"].items():
        dataset, arch = run.split("_")
        settings = {**section["defaults"], **overrides}
        paths = _configured_dataset(config, dataset, f"evaluate.finetune.runs.{run}")
        name = f"finetune_{backbone.name}_{run}"
        out = _run_dir(config, name)
        metrics = _metrics_path(config, "finetune", backbone.name, dataset, arch)
        processes = settings.get("nproc_per_node", 1)
        argv = _launcher(processes) + [
            "eval", "finetune", "--dataset", dataset, "--arch", arch, "--backbone", backbone.arch,
            "--init", backbone.init, "--index-dir", paths["index"], "--frames", paths["frames"],
            "--out", out, "--metrics", metrics,
        ] + _record_flags(config, config_path, backbone.seed) + list(backbone.flags) + _flags(settings, FINETUNE_FLAGS)
        jobs.append(Job(
            name, "finetune", tuple(argv), (paths["index"], paths["frames"]) + backbone.deps + CODE["finetune"],
            out_files=(f"{out}/model.pt", f"{out}/summary.json", f"{out}/test_scores.npz"),
            metrics_files=(metrics,),
            persist_files=(f"{out}/checkpoint_last.pt", f"{out}/log.jsonl"),
            params=tuple(dict.fromkeys(("evaluate.finetune.defaults", f"evaluate.finetune.runs.{run}")
                                       + RECORD_PARAMS + backbone.params)),
            log=_log(config, name), threads=max(1, settings.get("workers", 0)),
            resources=_gpu_resources(settings.get("gpus", 0), 48),
            meta=_evaluation_meta("finetune", dataset, arch, backbone),
        ))
    return jobs


def localize_job(config: dict, config_path: str, backbone: Backbone, classifier: Job) -> Job:
    """`vclr eval localize`: BMN on the snippet scores of `classifier` (the backbone's ActivityNet
    TSN). The snippet features and the BMN checkpoint persist: a rerun reuses what still matches."""
    settings = config["evaluate"]["localize"]
    paths = _configured_dataset(config, "anet", "evaluate.localize")
    name = f"localize_{backbone.name}_anet"
    work = _run_dir(config, name)
    snippets = _features_path(config, f"{backbone.name}_anet_snippets")
    metrics = _metrics_path(config, "localize", backbone.name, "anet")
    model = classifier.out_files[0]
    argv = ["vclr", "eval", "localize", "--index", paths["index"], "--frames", paths["frames"],
            "--classifier", model, "--features", snippets, "--work", work, "--out", metrics,
            ] + _record_flags(config, config_path, backbone.seed) + _flags(settings, LOCALIZE_FLAGS, spread=("hidden",))
    split = settings.get("eval_split", "val")  # the CLI's default evaluation split
    return Job(name, "localize", tuple(argv), (paths["index"], paths["frames"], model) + CODE["localize"],
               out_files=(f"{work}/proposals_{split}.json", f"{work}/scored_{split}_videos.txt"),
               metrics_files=(metrics,), persist_files=(snippets, f"{work}/bmn_checkpoint.pt"),
               params=("evaluate.localize",) + RECORD_PARAMS, log=_log(config, name),
               threads=max(1, settings.get("workers", 0)), resources=_gpu_resources(settings.get("gpus", 0), 24),
               meta=_evaluation_meta("localize", "anet", None, backbone))


def evaluation_jobs(config: dict, config_path: str) -> list[Job]:
    """Every downstream evaluation of every evaluated backbone: features, then retrieval, the
    linear probe, fine-tuning and localisation. `config_path` goes into each metrics record."""
    section = config.get("evaluate")
    if not section:
        return []
    features: dict[tuple, Job] = {}  # the features jobs, in the order first asked for
    grouped = (section.get("features") or {}).get("group", "split") == "backbone"
    split_jobs: dict[tuple, Job] = {}  # one split's job: what an evaluation reads (and runs, unless grouped)
    requests: dict[tuple, tuple[Backbone, list]] = {}  # trunk -> (first backbone asking, its splits)

    def features_for(backbone: Backbone, dataset: str, split: str, key: str) -> Job:
        """The job of one split's features. Keyed by what decides them: a twin run (same checkpoint)
        reuses the first one's. With evaluate.features.group `backbone`, the job that runs is the
        trunk's one job for all its splits (rebuilt as splits are asked for, in place; named after
        the first backbone asking); the split's job returned only names its .npz, which the grouped
        job writes too (its out_files list them all)."""
        weights = (backbone.init, backbone.seed) if backbone.init == RANDOM else (backbone.init,)
        trunk = (*weights, backbone.arch, backbone.flags)
        identity = (*trunk, dataset, split)
        if identity not in split_jobs:
            split_jobs[identity] = features_job(config, backbone, dataset, split, key)
            owner, wanted = requests.setdefault(trunk, (backbone, []))
            wanted.append(_features_request(config, backbone, dataset, split, key))
            if grouped:
                features[trunk] = _features_job(config, owner, owner.name, wanted)
            else:
                features[identity] = split_jobs[identity]
        return split_jobs[identity]

    def feature_evaluations(backbone: Backbone, tasks: tuple[str, ...]) -> list[Job]:
        jobs = []
        for dataset in section.get("retrieval", {}).get("datasets", []) if "retrieval" in tasks else ():
            gallery, queries = (features_for(backbone, dataset, split, "evaluate.retrieval.datasets")
                                for split in RETRIEVAL_SPLITS)
            split = config["datasets"][dataset].get("split")
            protocol = ["--protocol", f"knn_cosine_split{split}"] if split is not None else []
            jobs.append(_feature_evaluation_job(
                config, config_path, "retrieval", backbone, dataset, gallery, queries, protocol,
                (f"datasets.{dataset}.split",) if split is not None else ()))
        probe = section.get("linear_probe")
        if probe and "linear_probe" in tasks:
            train, test = (features_for(backbone, probe["dataset"], probe[key], "evaluate.linear_probe")
                           for key in ("train_split", "test_split"))
            jobs.append(_feature_evaluation_job(
                config, config_path, "linear_probe", backbone, probe["dataset"], train, test,
                _flags(probe, ("C", "jobs")), ("evaluate.linear_probe",), threads=probe.get("jobs", 1)))
        return jobs

    backbones = evaluated_backbones(config)
    evaluations: list[Job] = []
    for backbone in backbones:
        evaluations += feature_evaluations(backbone, FEATURE_TASKS)
    ablation_tasks = tuple((config.get("ablations") or {}).get("evaluate", ()))
    for backbone in ablation_backbones(config):
        evaluations += feature_evaluations(backbone, ablation_tasks)
    seeds_tuned = (section.get("finetune") or {}).get("seeds_per_run")
    for backbone in backbones:
        seeds = [other.seed for other in backbones if other.meta["run"] == backbone.meta["run"]]
        if seeds_tuned is not None and backbone.seed not in seeds[:seeds_tuned]:
            continue  # fine-tuning and localisation for the first seeds of a run only (config)
        tuned = ({job.name: job for job in finetune_jobs(config, config_path, backbone)}
                 if "finetune" in section else {})
        evaluations += tuned.values()
        if "localize" in section:
            classifier = tuned.get(f"finetune_{backbone.name}_{LOCALIZE_CLASSIFIER}")
            if classifier is None:
                raise VclrError(f"config key 'evaluate.localize': needs evaluate.finetune.runs."
                                f"{LOCALIZE_CLASSIFIER} (its snippet classifier)")
            evaluations.append(localize_job(config, config_path, backbone, classifier))
    return list(features.values()) + evaluations


def picture_source(config: dict, jobs: list[Job]) -> Job | None:
    """The retrieval job whose ranking the report pictures: report.retrieval_picture.dataset
    (default the first retrieval dataset) of the first pretrained reference backbone."""
    wanted = (config.get("report") or {}).get("retrieval_picture", {}).get("dataset")
    for job in jobs:
        meta = job.meta
        if (job.stage == "retrieval" and meta["reference"] and meta["run"] != RANDOM
                and (wanted is None or meta["dataset"] == wanted)):
            return job
    return None


def report_job(config: dict, config_path: str, jobs: list[Job]) -> Job:
    """`vclr report build`: every metrics record and pretraining log of the profile into the
    tables and figures of paths.tables (kept in git: DVC `cache: false`)."""
    out = config["paths"]["tables"]
    deps = [path for job in jobs for path in job.metrics_files]
    deps += [job.meta["summary"] for job in jobs if job.stage == "pretrain"]  # its log.jsonl beside it
    picture = picture_source(config, jobs)
    if picture is not None:
        deps += [picture.meta["gallery"], picture.meta["queries"], picture.meta["frames"]]
    argv = ("vclr", "report", "build", "--config", config_path, "--out", out)
    # per-step training logs as CSV (the report writes them): what `dvc plots show` draws
    curves = {job.name.removeprefix("pretrain_"): f"{out}/curves/{job.name.removeprefix('pretrain_')}.csv"
              for job in jobs if job.stage == "pretrain"}
    return Job("report", "report", argv, tuple(dict.fromkeys(deps)) + CODE["report"], committed_dirs=(out,),
               params=tuple(key for key in ("report", "ablations", "profile") if key in config),
               log=_log(config, "report"), meta={"curves": curves})


def expand_jobs(config: dict, config_path: str) -> list[Job]:
    """Every job of the profile, in dependency order. `config_path`: the profile's file as the
    commands see it (relative to the repository root), recorded in every metrics record."""
    jobs: list[Job] = []
    pretraining = pretrain_jobs(config)
    for dataset in DATASETS:
        if dataset in config["datasets"]:
            # a pretraining dataset's data first, at its costliest run's priority
            priority = max((job.priority for job in pretraining if job.meta.get("dataset") == dataset), default=0)
            jobs += [replace(job, priority=priority) for job in data_jobs(config, dataset)]
    jobs += pretraining
    jobs += evaluation_jobs(config, config_path)
    if any(job.metrics_files for job in jobs):
        jobs.append(report_job(config, config_path, jobs))
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
        outs = list(job.out_dirs + job.out_files) + [{path: {"persist": True}} for path in job.persist_files]
        outs += [{path: {"cache": False}} for path in job.committed_dirs]
        if outs:
            stage["outs"] = outs
        if job.metrics_files:
            stage["metrics"] = [{path: {"cache": False}} for path in job.metrics_files]
        stages[job.name] = stage
    curves = {run: path for job in jobs if job.stage == "report" for run, path in job.meta["curves"].items()}
    if not curves:
        return {"stages": stages}
    plots = [{f"pretraining {column}": {"x": "step", "y": {path: column for path in curves.values()},
                                         "template": "linear"}} for column in ("total", "lr")]
    return {"stages": stages, "plots": plots}


def relative_wdir(dvc_yaml_path: str) -> str:
    """The repository root as seen from the folder of a dvc.yaml (for its stages' `wdir`)."""
    folder = os.path.dirname(os.path.normpath(dvc_yaml_path)) or "."
    return os.path.relpath(".", folder).replace(os.sep, "/")
