"""The evaluation jobs of the experiment matrix: names, paths, deps, params, launchers, config errors."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from vclr.config import load_config, validate_config
from vclr.errors import VclrError
from vclr.matrix import CODE, dvc_stages, expand_jobs, final_targets

PROFILES = {"tiny": "config/config.yaml", "paper": "config/paper.yaml"}
FINETUNE_RUNS = ("ucf101_tsn", "hmdb51_tsn", "ssv2_tsn", "ssv2_tsm", "anet_tsn")


def _jobs(profile: str, features_group: str = "split") -> dict:
    """The profile's jobs, its features one job per split (the default; the grouped form is checked
    against it in test_features_grouped_by_backbone_write_the_same_files_one_job_per_trunk)."""
    path = PROFILES[profile]
    config = load_config(REPO / path)
    config["evaluate"]["features"]["group"] = features_group
    return {job.name: job for job in expand_jobs(config, path)}


# The evaluated backbones: tiny pretrains vclr_k400 with two seeds (runs <name>_seed<N>) and an
# ablation grid evaluated by retrieval only; the paper profile one run.
MAIN_BACKBONES = {"tiny": ("vclr_k400_seed0", "vclr_k400_seed1", "random"), "paper": ("vclr_k400", "random")}
ABLATION_BACKBONES = {"tiny": ("vclr_k400_ablation", "vclr_k400_losses_seco", "vclr_k400_losses_segment",
                               "vclr_k400_segments_k4", "vclr_k400_epochs_e134", "vclr_k400_init_moco",
                               "vclr_k400_backbone_reference", "vclr_k400_backbone_r2plus1d"), "paper": ()}
# ablation entries with the main run's settings: its checkpoint and features, their own records
TWINS = {"vclr_k400_epochs_e134": "vclr_k400_seed0", "vclr_k400_backbone_reference": "vclr_k400_seed0"}


def _retrieval_evaluations(backbone: str) -> set[str]:
    features = backbone not in TWINS
    return ({f"features_{backbone}_{dataset}_{split}" for dataset in ("ucf101", "hmdb51")
             for split in ("train", "test") if features}
            | {f"retrieval_{backbone}_{dataset}" for dataset in ("ucf101", "hmdb51")})


def _expected_evaluations(backbone: str) -> set[str]:
    return (_retrieval_evaluations(backbone) | {f"features_{backbone}_k400_{split}" for split in ("train", "val")}
            | {f"linear_probe_{backbone}_k400", f"localize_{backbone}_anet"}
            | {f"finetune_{backbone}_{run}" for run in FINETUNE_RUNS})


@pytest.mark.parametrize("profile", PROFILES)
def test_every_backbone_gets_every_evaluation(profile):
    jobs = _jobs(profile)
    evaluations = {name for name, job in jobs.items()
                   if job.stage in ("features", "retrieval", "linear_probe", "finetune", "localize")}
    main = MAIN_BACKBONES[profile]
    # tiny: evaluate.finetune.seeds_per_run 1 -> the second seed gets the frozen-feature evaluations only
    probed = [name for name in main if name.endswith("_seed1")]
    expected = set().union(*map(_expected_evaluations, [name for name in main if name not in probed]),
                           *map(_retrieval_evaluations, ABLATION_BACKBONES[profile] + tuple(probed)),
                           *({f"features_{name}_k400_{split}" for split in ("train", "val")}
                             | {f"linear_probe_{name}_k400"} for name in probed))
    assert evaluations == expected


@pytest.mark.parametrize("profile", PROFILES)
def test_metrics_records_feed_the_report_from_results_metrics(profile):
    jobs = _jobs(profile)
    results = load_config(REPO / PROFILES[profile])["paths"]["results"]
    metrics = [path for job in jobs.values() for path in job.metrics_files]
    probed = sum(name.endswith("_seed1") for name in MAIN_BACKBONES[profile])  # no fine-tuning (seeds_per_run)
    assert len(metrics) == (len(MAIN_BACKBONES[profile]) * (2 + 1 + 5 + 1) - probed * (5 + 1)
                            + 2 * len(ABLATION_BACKBONES[profile]))
    # every record feeds the report, whose tables are a final target
    final = final_targets(list(jobs.values()))
    assert load_config(REPO / PROFILES[profile])["paths"]["tables"] in final and not set(metrics) & set(final)
    assert set(metrics) <= set(jobs["report"].deps)
    backbones = "|".join(MAIN_BACKBONES[profile] + ABLATION_BACKBONES[profile])
    pattern = re.compile(rf"^{re.escape(results)}/metrics/(retrieval|linear_probe|finetune|localize)/"
                         rf"({backbones})_(k400|ucf101|hmdb51|ssv2|anet)(_tsn|_tsm)?\.json$")
    assert all(pattern.match(path) for path in metrics), metrics
    for job in jobs.values():
        # features are DVC's (git-ignored), like checkpoints; only records are committed
        assert all(path.startswith((f"{results}/features/", f"{results}/checkpoints/"))
                   for path in job.out_files + job.persist_files if job.metrics_files or job.stage == "features")


@pytest.mark.parametrize("profile", PROFILES)
def test_evaluation_deps_hold_their_code_inputs_and_params(profile):
    jobs = _jobs(profile)
    results = load_config(REPO / PROFILES[profile])["paths"]["results"]
    trained = {name: f"{results}/checkpoints/{name}/backbone.pt"
               for name in MAIN_BACKBONES[profile] + ABLATION_BACKBONES[profile] if name != "random"}
    trained.update({twin: trained[main] for twin, main in TWINS.items()} if profile == "tiny" else {})
    for job in jobs.values():
        if job.stage not in CODE or job.stage in ("download", "generate", "extract", "index", "pretrain", "report"):
            continue
        assert set(CODE[job.stage]) <= set(job.deps), job.name
        assert job.params, job.name
        if job.metrics_files:
            assert {"seed", "profile"} <= set(job.params), job.name  # --seed, --profile of the record
        backbone = max((name for name in trained if f"_{name}_" in job.name), key=len, default=None)
        if "_random_" in job.name:
            assert not set(trained.values()) & set(job.deps), job.name
            if job.stage in ("features", "finetune"):  # they draw the initialisation
                assert {"seed", "pretrain.defaults.backbone"} <= set(job.params), job.name
        elif job.stage != "localize":  # (localize reads the fine-tuned classifier)
            assert trained[backbone] in job.deps, job.name  # the record hashes it
    for backbone in (name for name in MAIN_BACKBONES[profile] if not name.endswith("_seed1")):
        localize = jobs[f"localize_{backbone}_anet"]
        classifier = jobs[f"finetune_{backbone}_anet_tsn"].out_files[0]
        assert classifier.endswith("/model.pt") and classifier in localize.deps
        assert localize.argv[localize.argv.index("--classifier") + 1] == classifier
        retrieval = jobs[f"retrieval_{backbone}_ucf101"]
        assert "datasets.ucf101.split" in retrieval.params and "knn_cosine_split1" in retrieval.argv
        assert jobs[f"features_{backbone}_ucf101_test"].out_files[0] in retrieval.deps
    random = jobs["features_random_k400_train"].argv
    assert random[random.index("--checkpoint") + 1] == "random" and random[random.index("--seed") + 1] == "0"
    assert jobs["finetune_random_ucf101_tsn"].argv[jobs["finetune_random_ucf101_tsn"].argv.index("--init") + 1] == "random"


def test_record_provenance_flags_name_the_profile_file():
    for profile, path in PROFILES.items():
        for job in _jobs(profile).values():
            if job.metrics_files:
                argv = list(job.argv)
                assert argv[argv.index("--config") + 1] == path and argv[argv.index("--profile") + 1] == profile


def test_paper_fine_tuning_runs_torchrun_on_gpus_and_tiny_stays_on_one_cpu_thread():
    paper, tiny = _jobs("paper"), _jobs("tiny")
    for backbone, small_backbone in (("vclr_k400", "vclr_k400_seed0"), ("random", "random")):
        for run in FINETUNE_RUNS:
            job = paper[f"finetune_{backbone}_{run}"]
            assert job.argv[:4] == ("torchrun", "--standalone", "--nproc_per_node=8", "-m")
            assert job.resources["gpu"] == 8
            small = tiny[f"finetune_{small_backbone}_{run}"]
            assert small.argv[0] == "vclr" and small.resources == {} and small.threads == 1
            # CPU-sized overrides of the published recipe
            assert {"--epochs", "--batch-size", "--crop", "--short-side"} <= set(small.argv)
            assert "--epochs" not in job.argv
        assert paper[f"features_{backbone}_k400_train"].resources["gpu"] == 1
        assert paper[f"localize_{backbone}_anet"].resources["gpu"] == 1
    localize = tiny["localize_vclr_k400_seed0_anet"].argv
    at = localize.index("--hidden")
    assert localize[at:at + 4] == ("--hidden", "32", "16", "32")  # nargs=3, not comma-joined


def test_dvc_stages_keep_records_in_git_and_training_state_across_reruns():
    jobs = expand_jobs(load_config(REPO / "config/config.yaml"), "config/config.yaml")
    stages = dvc_stages(jobs, "config/config.yaml")["stages"]
    finetune = stages["finetune_vclr_k400_seed0_ssv2_tsm"]
    assert finetune["metrics"] == [{"results/tiny/metrics/finetune/vclr_k400_seed0_ssv2_tsm.json": {"cache": False}}]
    persisted = [next(iter(out)) for out in finetune["outs"] if isinstance(out, dict)]
    assert persisted == ["results/tiny/checkpoints/finetune_vclr_k400_seed0_ssv2_tsm/checkpoint_last.pt",
                         "results/tiny/checkpoints/finetune_vclr_k400_seed0_ssv2_tsm/log.jsonl"]
    assert stages["report"]["outs"] == [{"paper_tables/tiny": {"cache": False}}]  # the tables live in git
    assert "outs" not in stages["retrieval_random_hmdb51"]  # its only output is the record
    localize = [next(iter(out)) for out in stages["localize_random_anet"]["outs"] if isinstance(out, dict)]
    assert localize == ["results/tiny/features/random_anet_snippets.npz",
                        "results/tiny/checkpoints/localize_random_anet/bmn_checkpoint.pt"]
    assert stages["linear_probe_random_k400"]["params"] == [
        {"config/config.yaml": ["evaluate.linear_probe", "seed", "profile"]}]


def _tiny_text() -> str:
    return (REPO / "config/config.yaml").read_text()


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda t: t.replace("ucf101_tsn: {", "ucf101_tsm: {"), "evaluate.finetune.runs.ucf101_tsm"),
        (lambda t: t.replace("num_frames: 8,", "num_frame: 8,"), "evaluate.features.num_frame"),
        (lambda t: t.replace("datasets: [ucf101, hmdb51]", "datasets: [ucf101, k400]"), "evaluate.retrieval.datasets.1"),
        (lambda t: t.replace("hidden: [32, 16, 32]", "hidden: [32, 16]"), "evaluate.localize.hidden"),
        (lambda t: t.replace("test_views: three", "test_views: five"), "evaluate.finetune.runs.ssv2_tsn.test_views"),
        (lambda t: re.sub(r"\n  features: .*", "", t), "features"),
    ],
)
def test_bad_evaluate_section_names_file_and_key(tmp_path, edit, key):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(_tiny_text()))
    with pytest.raises(VclrError) as error:
        load_config(path)
    assert str(path) in str(error.value) and key in str(error.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("backbones: [vclr_k400, random]", "backbones: [vclr_k401, random]"),
         "config key 'evaluate.backbones': 'vclr_k401' is neither a pretraining run"),
        (lambda t: re.sub(r"\n      anet_tsn: .*", "", t), "config key 'evaluate.localize': needs evaluate.finetune.runs.anet_tsn"),
    ],
)
def test_cross_references_in_evaluate_name_the_key(tmp_path, edit, message):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(_tiny_text()))
    with pytest.raises(VclrError, match=re.escape(message)):
        expand_jobs(load_config(path), str(path))


def test_pretraining_settings_of_the_config_become_flags_and_bad_momentum_is_refused():
    config = load_config(REPO / PROFILES["tiny"])
    config["pretrain"]["defaults"]["alpha"] = 0.99
    jobs = expand_jobs(config, PROFILES["tiny"])
    pretrain = next(job for job in jobs if job.name == "pretrain_vclr_k400_seed0").argv
    assert pretrain[pretrain.index("--alpha") + 1] == "0.99"
    config["pretrain"]["defaults"]["alpha"] = 1.0
    with pytest.raises(VclrError, match="pretrain.defaults.alpha"):
        validate_config(config, "config.yaml")


def test_seeds_and_the_ablation_grid_become_pretraining_runs():
    jobs = _jobs("tiny")
    config = load_config(REPO / PROFILES["tiny"])

    def flag(job, name):
        return job.argv[job.argv.index(name) + 1]

    for seed in (0, 1):
        job = jobs[f"pretrain_vclr_k400_seed{seed}"]
        assert flag(job, "--seed") == str(seed) and job.meta["run"] == "vclr_k400" and job.meta["reference"]
        assert flag(jobs[f"retrieval_vclr_k400_seed{seed}_ucf101"], "--seed") == str(seed)  # the record's seed
    base, main = jobs["pretrain_vclr_k400_ablation"], jobs["pretrain_vclr_k400_seed0"]
    assert flag(base, "--epochs") == str(config["ablations"]["settings"]["epochs"]) != flag(main, "--epochs")
    seco = jobs["pretrain_vclr_k400_losses_seco"]
    assert flag(seco, "--losses") == "inter,intra" and flag(seco, "--epochs") == flag(base, "--epochs")
    assert seco.meta["ablation"] == {"axis": "losses", "label": "L_inter + L_intra (SeCo)"}
    assert flag(jobs["pretrain_vclr_k400_segments_k4"], "--segments") == "4"
    # an ablation entry identical to the main run reuses its checkpoint instead of training again
    # and its features: only the record is its own
    assert "pretrain_vclr_k400_epochs_e134" not in jobs and "features_vclr_k400_epochs_e134_ucf101_test" not in jobs
    twin = jobs["retrieval_vclr_k400_epochs_e134_ucf101"]
    assert flag(twin, "--test") == jobs["features_vclr_k400_seed0_ucf101_test"].out_files[0]
    assert twin.meta["ablation"] == {"axis": "epochs", "label": "134 epochs"}
    # an axis with its own settings (backbone: the main schedule) has its own reference row, here a twin
    assert "pretrain_vclr_k400_backbone_reference" not in jobs
    assert jobs["retrieval_vclr_k400_backbone_reference_ucf101"].meta["ablation"] == {
        "axis": "backbone", "label": None, "reference": True}
    clips = jobs["pretrain_vclr_k400_backbone_r2plus1d"]
    assert flag(clips, "--epochs") == flag(main, "--epochs") and flag(clips, "--backbone") == "r2plus1d_tiny"
    assert "ablations.axes.backbone.settings" in clips.params
    # every evaluation of a 3D backbone takes its clip
    for name in ("pretrain_vclr_k400_backbone_r2plus1d", "features_vclr_k400_backbone_r2plus1d_hmdb51_train"):
        assert (flag(jobs[name], "--clip-frames"), flag(jobs[name], "--clip-stride")) == ("4", "2"), name
    assert "--clip-frames" not in jobs["features_vclr_k400_seed0_ucf101_test"].argv
    # init: moco_v2 on a profile without ImageNet weights starts from the stand-in, in MoCo v2's layout
    standin, moco = jobs["pretrain_moco_v2_standin"], jobs["pretrain_vclr_k400_init_moco"]
    assert standin.argv[:3] == ("vclr", "train", "moco-standin") and flag(standin, "--losses") == "inter"
    assert flag(moco, "--init") == f"moco_v2:{standin.out_files[0]}" and standin.out_files[0] in moco.deps
    assert "download_moco_v2" not in jobs
    # ablation runs are scored on frozen features only (ablations.evaluate)
    assert not any(name.startswith(("finetune_vclr_k400_losses", "linear_probe_vclr_k400_losses")) for name in jobs)
    del config["ablations"]["settings"]  # no shared schedule: the grid's reference is the main run itself
    names = {job.name for job in expand_jobs(config, PROFILES["tiny"])}
    assert "pretrain_vclr_k400_ablation" not in names and "retrieval_vclr_k400_ablation_ucf101" in names
    report = jobs["report"]
    assert main.meta["summary"] in report.deps and "vclr/report/published_results.csv" in report.deps
    assert report.argv == ("vclr", "report", "build", "--config", "config/config.yaml", "--out", "paper_tables/tiny")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("reference: vclr_k400", "reference: vclr_k999"), "'ablations.reference': 'vclr_k999'"),
    (lambda t: t.replace('seco: {label: "L_inter + L_intra (SeCo)", ', "seco: {"), "seco.label"),
    (lambda t: t.replace("vclr_k400: {dataset: k400, seeds: [0, 1]}", "vclr_k400: {dataset: k400, seeds: []}"),
     "pretrain.runs.vclr_k400.seeds"),
    (lambda t: t.replace("  settings: {epochs: 20}", "  settings: {epochs: 20, label: x}"), "ablations.settings"),
])
def test_bad_seeds_or_ablations_name_the_key(tmp_path, edit, message):
    path = tmp_path / "bad.yaml"
    text = edit(_tiny_text())
    assert text != _tiny_text()
    path.write_text(text)
    with pytest.raises(VclrError, match=re.escape(message)):
        expand_jobs(load_config(path), str(path))


@pytest.mark.parametrize("profile", PROFILES)
def test_features_grouped_by_backbone_write_the_same_files_one_job_per_trunk(profile):
    """evaluate.features.group: `backbone` runs one features job per evaluated trunk (twin runs share
    it) writing exactly the files of the per-split jobs; every other job is unchanged and each
    evaluation still depends on exactly the .npz files it reads, now the grouped job's outputs."""
    path = PROFILES[profile]
    config = load_config(REPO / path)
    config["evaluate"]["features"]["group"] = "split"
    by_split = expand_jobs(config, path)
    config["evaluate"]["features"]["group"] = "backbone"
    by_backbone = expand_jobs(config, path)
    split_jobs = [job for job in by_split if job.stage == "features"]
    grouped = [job for job in by_backbone if job.stage == "features"]
    assert [job for job in by_split if job.stage != "features"] == [job for job in by_backbone if job.stage != "features"]
    # one job per distinct trunk (checkpoint or random seed, architecture, clip) among the split jobs;
    # paper by hand: 12 split jobs -> vclr_k400 and random
    def trunk(job):
        return tuple(job.argv[i:i + 2] for i, flag in enumerate(job.argv)
                     if flag in ("--backbone", "--checkpoint", "--seed", "--clip-frames", "--clip-stride"))

    assert len(grouped) == len({trunk(job) for job in split_jobs}) < len(split_jobs)
    assert all(trunk(job) == trunk(split_job) for job in grouped for split_job in split_jobs
               if set(split_job.out_files) & set(job.out_files))
    if profile == "paper":
        assert (len(split_jobs), [job.name for job in grouped]) == (12, ["features_vclr_k400", "features_random"])
    else:  # twins of vclr_k400_seed0 (same checkpoint) get no job of their own
        assert {"features_vclr_k400_seed0", "features_random"} <= {job.name for job in grouped}
        assert not {"features_vclr_k400_epochs_e134", "features_vclr_k400_backbone_reference"} & {job.name for job in grouped}
    producers = {out: job for job in grouped for out in job.out_files}
    assert len(producers) == sum(len(job.out_files) for job in grouped)  # no file written twice
    assert sorted(producers) == sorted(out for job in split_jobs for out in job.out_files)
    for job in grouped:
        argv = list(job.argv)
        assert "--index" not in argv and argv.count("--split") == len(job.out_files) >= 4
        triples = [tuple(argv[i + 1:i + 4]) for i, flag in enumerate(argv) if flag == "--split"]
        for (index_csv, frames, out), split_job in zip(triples, (next(s for s in split_jobs if s.out_files == (o,))
                                                                 for o in job.out_files)):
            single = list(split_job.argv)
            assert (index_csv, frames, out) == tuple(single[single.index(f) + 1] for f in ("--index", "--frames", "--out"))
            assert set(split_job.deps) <= set(job.deps) and split_job.params == job.params
            assert argv[:7] == single[:7]  # vclr eval features --backbone A --checkpoint C
            assert argv[len(argv) - len(single) + 13:] == single[13:]  # --seed, clip and settings flags after --out
    for job in by_backbone:
        if job.stage in ("retrieval", "linear_probe"):
            reads = [job.argv[job.argv.index(flag) + 1] for flag in ("--train", "--test")]
            assert [dep for dep in job.deps if dep.endswith(".npz")] == reads
            assert all(producers[path].stage == "features" for path in reads)
    assert dvc_stages(by_backbone, path)["stages"][grouped[0].name]["outs"] == list(grouped[0].out_files)


def test_the_costliest_pretraining_and_its_data_are_scheduled_first():
    """Snakemake starts ready jobs by priority: pretraining by epochs x clip frames, the data of a
    pretraining dataset at its costliest run's, everything else 0 (the tiny 3D run started 164 s
    late behind short jobs in a measured run, which set the pipeline's wall time)."""
    jobs = _jobs("tiny")
    clips, main, seco = (jobs[f"pretrain_vclr_k400_{name}"] for name in ("backbone_r2plus1d", "seed0", "losses_seco"))
    assert clips.priority == 134 * 4 > main.priority == 134 > seco.priority == 20
    assert all(jobs[f"{stage}_k400"].priority == clips.priority for stage in ("generate", "extract", "index"))
    assert all(job.priority == 0 for job in jobs.values()
               if job.stage not in ("pretrain", "generate", "extract", "index") or job.name.endswith("_ucf101"))
