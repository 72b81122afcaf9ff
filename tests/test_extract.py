"""`vclr data extract`: real tiny videos in, packed shards out; failures, resampling, padding, resume."""

from __future__ import annotations

import fractions
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

from vclr.cli import main as cli_main
from vclr.data.extract import shard_of
from vclr.data.packed import (
    PackedFrames,
    ShardVideo,
    read_manifest,
    read_shard_videos,
    write_shard,
)

REPO = Path(__file__).resolve().parents[1]
CODECS = {".avi": "mpeg4", ".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "mpeg4"}


def frame_value(t: int) -> int:
    """Brightness of frame t in the test videos, so a stored frame tells which source frame it is."""
    return 16 + 8 * t


def make_video(path: Path, frames: int, size=(64, 48), fps: int = 30) -> Path:
    """A tiny video whose frame t is a flat grey of frame_value(t) plus a white left edge (for aspect)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix], rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if path.suffix == ".mp4":
            stream.options = {"preset": "ultrafast"}
        for t in range(frames):
            image = np.full((size[1], size[0], 3), frame_value(t), dtype=np.uint8)
            image[:, :8] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = 8000, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def extract_argv(videos: Path, out: Path, *flags: str) -> list[str]:
    return ["data", "extract", "--dataset", "toy", "--videos", str(videos), "--out", str(out),
            "--no-progress", *flags]


def extract(videos: Path, out: Path, *flags: str) -> int:
    return cli_main(extract_argv(videos, out, *flags))


def mean_value(frames: PackedFrames, key: str, i: int) -> float:
    """Mean of the grey area (right of the white edge) of stored frame i."""
    frame = frames.read_frame(key, i).float()
    return float(frame[:, :, frame.shape[2] // 3 :].mean())


def shard_contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


def test_round_trip_avi_mp4_webm(tmp_path, capsys):
    videos = tmp_path / "videos"
    counts = {
        "class_a/v_one": (".avi", 7),
        "class_b/deep/two": (".mp4", 9),
        "three": (".webm", 5),
    }
    for name, (suffix, n) in counts.items():
        make_video(videos / f"{name}{suffix}", n)
    assert (
        extract(videos, tmp_path / "frames", "--short-side", "24", "--shards", "3") == 0
    )
    assert "3 videos found, 3 extracted now" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "frames")
    assert manifest["failed"] == {} and not (tmp_path / "frames/.work").exists()
    frames = PackedFrames(tmp_path / "frames")
    assert sorted(frames.keys()) == ["three", "two", "v_one"]
    for name, (_, n) in counts.items():
        key = Path(name).name
        video = manifest["videos"][key]
        assert (video["frames"], video["decoded"], video["width"], video["height"]) == (
            n,
            n,
            32,
            24,
        )
        assert video["shard"] == f"shards/{shard_of(key, 3):05d}.vpk"
        assert frames.read_frame(key, n - 1).shape == (3, 24, 32)
        for i in (0, n - 1):
            assert abs(mean_value(frames, key, i) - frame_value(i)) < 4
    assert sorted(manifest["shards"]) == sorted(
        {v["shard"] for v in manifest["videos"].values()}
    )
    assert sorted(p.name for p in (tmp_path / "frames/shards").iterdir()) == sorted(
        Path(s).name for s in manifest["shards"]
    )


def test_exact_size_and_portrait_short_side(tmp_path):
    make_video(tmp_path / "videos/wide.avi", 3)
    make_video(tmp_path / "videos/tall.avi", 3, size=(48, 64))

    def sizes(name: str, *flags: str) -> dict[str, tuple[int, int]]:
        assert extract(tmp_path / "videos", tmp_path / name, *flags) == 0
        return {k: (v["width"], v["height"]) for k, v in read_manifest(tmp_path / name)["videos"].items()}

    assert sizes("exact", "--size", "20x10") == {"wide": (20, 10), "tall": (20, 10)}
    assert sizes("short", "--short-side", "36") == {"wide": (48, 36), "tall": (36, 48)}


def true_last_frame(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The last frame PyAV decodes from the file, resized like the extraction does, as RGB."""
    with av.open(str(path)) as container:
        last = list(container.decode(video=0))[-1]
    return last.reformat(*size, format="rgb24", interpolation="BICUBIC").to_ndarray()


def test_num_frames_pads_with_the_true_last_frame_and_cuts_long_videos(tmp_path):
    short = make_video(tmp_path / "videos/short.mp4", 5)
    make_video(tmp_path / "videos/long.avi", 12)
    assert (
        extract(
            tmp_path / "videos",
            tmp_path / "frames",
            "--short-side",
            "24",
            "--num-frames",
            "8",
        )
        == 0
    )
    manifest = read_manifest(tmp_path / "frames")
    assert (
        manifest["videos"]["short"]["frames"],
        manifest["videos"]["short"]["decoded"],
    ) == (8, 5)
    assert (
        manifest["videos"]["long"]["frames"],
        manifest["videos"]["long"]["decoded"],
    ) == (8, 8)
    frames = PackedFrames(tmp_path / "frames")
    last_real = frames.read_jpeg("short", 4)
    assert [frames.read_jpeg("short", i) for i in range(5, 8)] == [last_real] * 3
    expected = true_last_frame(short, (32, 24)).astype(float)
    stored = frames.read_frame("short", 7).permute(1, 2, 0).numpy().astype(float)
    assert np.abs(stored - expected).mean() < 3
    assert (
        np.abs(frames.read_frame("short", 0).permute(1, 2, 0).numpy() - expected).mean()
        > 20
    )
    assert (
        abs(mean_value(frames, "long", 7) - frame_value(7)) < 4
    )  # cut after frame 7, not sampled


def test_fps_resampling_picks_nearest_source_frames(tmp_path):
    make_video(tmp_path / "videos/clip.avi", 30, fps=30)  # 1 s

    def resampled(fps: str) -> PackedFrames:
        out = tmp_path / f"fps{fps}"
        assert extract(tmp_path / "videos", out, "--short-side", "24", "--fps", fps) == 0
        return PackedFrames(out)

    down = resampled("10")
    assert down.num_frames("clip") == 10
    assert [round((mean_value(down, "clip", k) - 16) / 8) for k in range(10)] == [3 * k for k in range(10)]
    up = resampled("60")
    assert up.num_frames("clip") == 60
    assert up.read_jpeg("clip", 40) == up.read_jpeg("clip", 41)  # source frame 20 twice
    assert abs(mean_value(up, "clip", 41) - frame_value(20)) < 4


def test_undecodable_videos_are_recorded_as_failed_and_the_run_succeeds(
    tmp_path, capsys
):
    videos = tmp_path / "videos"
    good = make_video(videos / "good.mp4", 4)
    (videos / "corrupt.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    )
    cut = make_video(videos / "sub/truncated.mp4", 20)
    cut.write_bytes(
        cut.read_bytes()[: cut.stat().st_size // 2]
    )  # libx264 mp4: moov atom at the end, now gone
    (videos / "empty.avi").write_bytes(b"")
    make_audio_only(videos / "audio_only.mkv")
    assert (
        extract(videos, tmp_path / "frames", "--short-side", "24", "--shards", "2") == 0
    )
    assert "4 failed" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "frames")
    assert list(manifest["videos"]) == ["good"]
    failed = manifest["failed"]
    assert sorted(failed) == ["audio_only", "corrupt", "empty", "truncated"]
    assert failed["truncated"]["source"] == "sub/truncated.mp4"
    assert "no video stream" in failed["audio_only"]["reason"]
    assert "empty file" in failed["empty"]["reason"]
    assert all(failed[k]["reason"] for k in failed)
    packed_keys = {
        k for p in (tmp_path / "frames/shards").iterdir() for k in read_shard_videos(p)
    }
    assert packed_keys == {"good"}

    # A rerun retries nothing that failed; --retry-failed does.
    assert (
        extract(videos, tmp_path / "frames", "--short-side", "24", "--shards", "2") == 0
    )
    assert "0 extracted now" in capsys.readouterr().out
    make_video(videos / "corrupt.mp4", 3)
    assert (
        extract(videos, tmp_path / "frames", "--short-side", "24", "--shards", "2") == 0
    )
    assert "corrupt" in read_manifest(tmp_path / "frames")["failed"]
    assert (
        extract(
            videos,
            tmp_path / "frames",
            "--short-side",
            "24",
            "--shards",
            "2",
            "--retry-failed",
        )
        == 0
    )
    assert "1 extracted now" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "frames")
    assert (
        sorted(manifest["videos"]) == ["corrupt", "good"]
        and "corrupt" not in manifest["failed"]
    )
    assert good.exists()


def test_duplicate_key_is_an_error_naming_both_paths(tmp_path, capsys):
    first = make_video(tmp_path / "videos/a/same.avi", 2)
    second = make_video(tmp_path / "videos/b/same.mp4", 2)
    assert extract(tmp_path / "videos", tmp_path / "frames", "--short-side", "24") == 2
    error = capsys.readouterr().err
    assert str(first) in error and str(second) in error and "'same'" in error


def test_changed_settings_are_refused(tmp_path, capsys):
    make_video(tmp_path / "videos/a.avi", 2)
    assert extract(tmp_path / "videos", tmp_path / "frames", "--short-side", "24") == 0
    assert extract(tmp_path / "videos", tmp_path / "frames", "--short-side", "32") == 2
    assert "manifest.json" in capsys.readouterr().err


def test_new_videos_rebuild_their_shard_and_equal_a_fresh_run(tmp_path, capsys):
    videos = tmp_path / "videos"
    for i in range(4):
        make_video(videos / f"v{i}.avi", 3 + i)
    assert (
        extract(videos, tmp_path / "grown", "--short-side", "24", "--shards", "1") == 0
    )
    for i in range(4, 6):
        make_video(videos / f"v{i}.avi", 3 + i)
    capsys.readouterr()
    assert (
        extract(videos, tmp_path / "grown", "--short-side", "24", "--shards", "1") == 0
    )
    assert "2 extracted now, 4 already done" in capsys.readouterr().out
    assert (
        extract(videos, tmp_path / "fresh", "--short-side", "24", "--shards", "1") == 0
    )
    assert read_manifest(tmp_path / "grown") == read_manifest(tmp_path / "fresh")
    assert shard_contents(tmp_path / "grown") == shard_contents(tmp_path / "fresh")


def run_cli(videos: Path, out: Path, *flags: str, **kwargs):
    """The same command in a real subprocess (short side 24, 4 shards unless `flags` override)."""
    command = [sys.executable, "-m", "vclr",
               *extract_argv(videos, out, "--short-side", "24", "--shards", "4", *flags)]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_killed_run_resumes_without_redoing_finished_videos(tmp_path):
    videos = tmp_path / "videos"
    for i in range(12):
        make_video(videos / f"clip{i:02d}.avi", 4)
    (videos / "broken.avi").write_bytes(b"not a video at all" * 10)
    out = tmp_path / "frames"
    process = run_cli(
        videos, out, "--pause-after-video", "0.25", start_new_session=True
    )
    parts = out / ".work/parts"
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and len(list(parts.glob("*.vpk")) if parts.exists() else []) < 2
    ):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the group of the process this test started
    process.communicate()
    assert not (out / "manifest.json").exists()
    done = {p.stem for p in parts.glob("*.vpk")} | {
        k for s in (out / ".work/shards").glob("*.vpk") for k in read_shard_videos(s)
    }
    done |= {p.stem for p in (out / ".work/failed").glob("*.json")}
    assert 2 <= len(done) < 13

    # A part file cut short by a crash (not written by the atomic path) must not count as finished,
    # nor may the temporary file of an interrupted atomic write.
    victim = next(f"clip{i:02d}" for i in range(12) if f"clip{i:02d}" not in done)
    write_shard(
        tmp_path / "whole.vpk",
        [ShardVideo(victim, 32, 24, 1, [b"\xff\xd8" + b"x" * 500])],
    )
    (parts / f"{victim}.vpk").write_bytes((tmp_path / "whole.vpk").read_bytes()[:300])
    (parts / f".{victim}.vpk.abc123.tmp").write_bytes(b"half")

    rerun = run_cli(videos, out)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert (
        f"{12 - len(done - {'broken'})} extracted now, {len(done)} already done"
        in stdout
    ), stdout
    assert not (out / ".work").exists()

    fresh = run_cli(videos, tmp_path / "fresh")
    assert fresh.communicate(timeout=120)[0] and fresh.returncode == 0
    assert read_manifest(out) == read_manifest(tmp_path / "fresh")
    assert shard_contents(out) == shard_contents(tmp_path / "fresh")
    assert PackedFrames(out).read_jpeg(victim, 3) != b"\xff\xd8" + b"x" * 500


def test_work_dir_outside_the_output_survives_its_deletion(tmp_path):
    """Snakemake and DVC delete a stage's output before rerunning it: the resume state must live
    outside it (`--work`), and the rerun must redo only what was not finished."""
    videos = tmp_path / "videos"
    for i in range(10):
        make_video(videos / f"clip{i:02d}.avi", 3)
    out, work = tmp_path / "frames", tmp_path / "work/frames"
    common = ("--shards", "3", "--work", str(work))
    process = run_cli(videos, out, *common, "--pause-after-video", "0.25", start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list(work.glob("**/*.vpk"))) < 4:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    done = {p.stem for p in (work / "parts").glob("*.vpk")} | {
        k for s in (work / "shards").glob("*.vpk") for k in read_shard_videos(s)
    }
    assert 1 <= len(done) < 10
    shutil.rmtree(out, ignore_errors=True)  # what the workflow manager does before the rerun
    rerun = run_cli(videos, out, *common)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert f"{10 - len(done)} extracted now, {len(done)} already done" in stdout, stdout
    assert not work.exists()
    fresh = run_cli(videos, tmp_path / "fresh", "--shards", "3")
    assert fresh.communicate(timeout=120)[0] and fresh.returncode == 0
    assert read_manifest(out) == read_manifest(tmp_path / "fresh")
    assert shard_contents(out) == shard_contents(tmp_path / "fresh")


def test_worker_pool_gives_the_same_result_as_one_process(tmp_path):
    for i in range(4):
        make_video(tmp_path / f"videos/w{i}.avi", 2 + i)
    common = ("--short-side", "24", "--shards", "2")
    assert extract(tmp_path / "videos", tmp_path / "one", *common) == 0
    assert extract(tmp_path / "videos", tmp_path / "two", *common, "--workers", "2") == 0
    assert read_manifest(tmp_path / "one") == read_manifest(tmp_path / "two")
    assert shard_contents(tmp_path / "one") == shard_contents(tmp_path / "two")


def test_class_folders_with_spaces_parentheses_and_apostrophes(tmp_path):
    """Kinetics' older per-class layout: folder names such as these reach every path step."""
    videos = tmp_path / "videos"
    names = ["passing American football (not in game)", "massaging person's head"]
    for i, label in enumerate(names):
        make_video(videos / "train" / label / f"yid{i:08d}_000010_000020.mp4", 3)
    out = tmp_path / "frames with space's (here)"
    assert extract(videos, out, "--short-side", "24", "--shards", "2") == 0
    manifest = read_manifest(out)
    assert sorted(manifest["videos"]) == ["yid00000000_000010_000020", "yid00000001_000010_000020"]
    assert manifest["failed"] == {}
    assert PackedFrames(out).num_frames("yid00000001_000010_000020") == 3
