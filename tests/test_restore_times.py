"""`vclr pipeline restore-times`: file times from content after `dvc pull`, so Snakemake reruns only
what changed (the end-to-end check on the tiny pipeline is in test_pipeline.py)."""

from __future__ import annotations

import os

from vclr.matrix import Job
from vclr.pipeline import restore_times


def _job(name: str, deps: tuple[str, ...], out: str) -> Job:
    return Job(name, "test", ("true",), deps, out_files=(out,))


def _chain(tmp_path):
    """source -> a -> b -> c, files written with scrambled times (as a pull leaves them)."""
    for index, name in enumerate(("code.py", "a.txt", "b.txt", "c.txt")):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (10_000 - index * 100,) * 2)  # later outputs look OLDER
    return [_job("a", ("code.py",), "a.txt"), _job("b", ("a.txt", "code.py"), "b.txt"),
            _job("c", ("b.txt",), "c.txt")]


def test_outputs_dvc_vouches_for_get_increasing_times_after_their_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = _chain(tmp_path)
    fresh, stale = restore_times(jobs, changed=set())
    assert fresh == ["a", "b", "c"] and stale == []
    times = [os.stat(tmp_path / name).st_mtime for name in ("code.py", "a.txt", "b.txt", "c.txt")]
    assert times == sorted(times) and len(set(times)) == 4


def test_a_changed_stage_and_everything_downstream_is_left_to_rerun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = _chain(tmp_path)
    fresh, stale = restore_times(jobs, changed={"b"})
    assert fresh == ["a"] and stale == ["b", "c"]
    assert os.stat(tmp_path / "b.txt").st_mtime == 0 and os.stat(tmp_path / "c.txt").st_mtime == 0
    assert os.stat(tmp_path / "a.txt").st_mtime > os.stat(tmp_path / "code.py").st_mtime


def test_a_missing_output_makes_its_job_stale(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = _chain(tmp_path)
    (tmp_path / "a.txt").unlink()
    fresh, stale = restore_times(jobs, changed=set())
    assert fresh == [] and stale == ["a", "b", "c"]
