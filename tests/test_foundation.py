"""Package, environment, config schema, experiment matrix and the generated DVC pipelines."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import REPO
from vclr.cli import main as cli_main
from vclr.config import config_hash, load_config
from vclr.data import DATASETS
from vclr.errors import VclrError
from vclr.matrix import expand_jobs, final_targets
from vclr.pipeline import render_dvc_yaml

EVALUATION_PREFIXES = ("features", "retrieval", "linear", "finetune", "localize")


def test_environment_yml_pins_agree_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = project["dependencies"] + project["optional-dependencies"]["test"]
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert sorted(pip_block) == sorted(pinned)
    assert all("==" in requirement for requirement in pinned), "every dependency is pinned"


@pytest.mark.parametrize("path", ["config/config.yaml", "config/paper.yaml"])
def test_profiles_validate(path):
    config = load_config(REPO / path)
    assert set(config["datasets"]) == set(DATASETS)


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def _tiny_text():
    return (REPO / "config/config.yaml").read_text()


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda t: t.replace("seed: 0", "seed: 0\nsede: 1"), "sede"),
        (lambda t: t.replace("shards: 2,", "shards: two,", 1), "datasets.ucf101.extract.shards"),
        (lambda t: t.replace("quality: 90}", "quality: 90, qualty: 3}", 1), "qualty"),
        (lambda t: t.replace("  ssv2:", "  sthsth:"), "datasets.sthsth"),
        (lambda t: t.replace("short_side: 80,", "short_side: 80, size: [96, 80],", 1), "extract"),
        (lambda t: t.replace("source: synthetic", "source: torrent", 1), "datasets.k400.source"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, edit, key):
    path = _write(tmp_path, edit(_tiny_text()))
    with pytest.raises(VclrError) as error:
        load_config(path)
    assert str(path) in str(error.value) and key in str(error.value)


def test_unparsable_config_names_line(tmp_path):
    path = _write(tmp_path, "profile: tiny\nseed: [0\n")
    with pytest.raises(VclrError, match=r"bad\.yaml line \d+"):
        load_config(path)


def test_config_hash_ignores_key_order():
    config = load_config(REPO / "config/config.yaml")
    reordered = dict(reversed(list(config.items())))
    assert config_hash(config) == config_hash(reordered)
    changed = dict(config, seed=config["seed"] + 1)
    assert config_hash(changed) != config_hash(config)


@pytest.mark.parametrize(
    "config_path, dvc_path",
    [("config/config.yaml", "dvc.yaml"), ("config/paper.yaml", "pipelines/paper/dvc.yaml")],
)
def test_committed_dvc_yaml_is_what_the_matrix_generates(config_path, dvc_path):
    """Regenerate with `make dvc-yaml` when this fails."""
    assert (REPO / dvc_path).read_text() == render_dvc_yaml(config_path, dvc_path)


def test_matrix_jobs_are_consistent():
    for path in ("config/config.yaml", "config/paper.yaml"):
        jobs = expand_jobs(load_config(REPO / path), path)
        outs = [out for job in jobs for out in job.outs]
        assert len(outs) == len(set(outs)), "two jobs write the same output"
        produced = set(outs)
        for job in jobs:
            for dep in job.deps:
                assert dep in produced or (REPO / dep).exists(), f"{job.name} reads {dep}: nobody makes it"
        assert final_targets(jobs), "all_tables has targets"


def test_paper_dag_dry_run_lists_every_job_with_the_dvc_command():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "all_tables", "--configfile", "config/paper.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for dataset in DATASETS:
        for stage in ("download", "extract", "index"):
            assert f"{stage}_{dataset}" in result.stdout, f"{stage}_{dataset} missing from the paper DAG"
    stages = yaml.safe_load((REPO / "pipelines/paper/dvc.yaml").read_text())["stages"]
    evaluations = [name for name in stages if name.split("_")[0] in EVALUATION_PREFIXES]
    assert len(evaluations) == 30, evaluations  # 2 backbones x (6 features + 2 + 1 + 5 + 1)
    for name, stage in stages.items():
        # the same command under both executors (Snakemake is handed an absolute --configfile)
        assert f"rule {name}:" in result.stdout, f"{name} missing from the paper DAG"
        assert f"{stage['cmd']} > logs/paper/{name}.log" in result.stdout, f"{name}: another command"


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    assert "data" in capsys.readouterr().out


def test_cli_reports_vclr_errors_without_traceback(tmp_path):
    bad = _write(tmp_path, "profile: tiny\n")
    result = subprocess.run(
        [sys.executable, "-m", "vclr", "pipeline", "jobs", "--config", str(bad)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "bad.yaml" in result.stderr


def test_slurm_profile_resolves_the_paper_dag_with_gpu_resources():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "all_tables", "--configfile", "config/paper.yaml",
         "--workflow-profile", "workflow/profiles/slurm"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pretrain = result.stdout.split("rule pretrain_vclr_k400:")[1].split("\n\n")[0]
    assert "gpu=8" in pretrain and "nodes=1" in pretrain
    for backbone in ("vclr_k400", "random"):
        for rule, gpus in ((f"finetune_{backbone}_ssv2_tsm", 8), (f"features_{backbone}_k400_train", 1),
                           (f"localize_{backbone}_anet", 1)):
            block = result.stdout.split(f"rule {rule}:")[1].split("\n\n")[0]
            assert f"gpu={gpus}" in block, block
    assert "torchrun --standalone --nproc_per_node=8 -m vclr train pretrain" in render_dvc_yaml(
        "config/paper.yaml", "pipelines/paper/dvc.yaml")


def test_snakemake_lint_is_clean():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "good condition" in result.stdout + result.stderr, result.stdout
