"""Shared fixtures. The tiny pipeline runs end to end ONCE per test session (it takes minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_ANNOTATIONS = REPO.parent / "shared" / "real_annotations"


def copy_checkout(destination: Path) -> Path:
    """Copy what a fresh clone would hold (tracked + untracked, not ignored files) to `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    return destination


def run(argv: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output (the pipeline's logs say what broke)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        logs = "".join(
            f"\n--- {log}\n{log.read_text()[-3000:]}" for log in sorted(cwd.glob("logs/**/*.log"))
        )
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}{logs}"
        )
    return result


def run_together(commands: list[list[str]], directories: list[Path], timeout: int = 1800) -> None:
    """Run commands side by side (each in its directory); fail, with its output, if any fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    logs = [cwd / ".run_together.log" for cwd in directories]  # files, not pipes: no full-pipe stalls
    processes = []
    for argv, cwd, log in zip(commands, directories, logs):
        with open(log, "w") as handle:
            processes.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT))
    for process in processes:
        process.wait(timeout=timeout)
    for argv, process, log in zip(commands, processes, logs):
        output = log.read_text()
        log.unlink()
        if process.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {process.returncode}\n{output[-6000:]}")


@pytest.fixture(scope="session")
def real_annotations() -> Path:
    if not REAL_ANNOTATIONS.is_dir():
        pytest.fail(f"the real annotation fixtures are missing: {REAL_ANNOTATIONS}")
    return REAL_ANNOTATIONS


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A fresh copy of the checkout where `snakemake all_tables` ran on the tiny profile."""
    checkout = copy_checkout(tmp_path_factory.mktemp("tiny_snakemake"))
    run([sys.executable, "-m", "snakemake", "--cores", "2", "all_tables"], cwd=checkout, timeout=2400)
    return checkout
