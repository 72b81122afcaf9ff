"""Packed frame storage: many videos' JPEG frames in one self-describing shard file (`.vpk`).

The paper's Kinetics layout is ~72 million loose JPEGs; DVC and file systems choke on that, so frames
are concatenated per video and videos grouped into shards. A shard is ONE file readable by random
access (pread):

    [HEADER_MAGIC 8 bytes][frame 0 JPEG][frame 1 JPEG]...[offsets: uint64 LE, F+1 values][index JSON]
    [trailer: index_json_len u64, offsets_count u64, crc32(offsets+json) u32, TRAILER_MAGIC 8 bytes]

The index JSON maps key -> [first_frame, frames, width, height, decoded]; frame j of the shard spans
bytes [offsets[j], offsets[j+1]). The magic at the very end makes a truncated file detectable, the CRC
a damaged index.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vclr.errors import VclrError
from vclr.io_utils import atomic_open

FORMAT = "vclr-packed-frames/1"
HEADER_MAGIC = b"VCLRPK1\n"
TRAILER_MAGIC = b"VCLREND\n"
_TRAILER = struct.Struct("<QQI8s")


class VideoEntry(NamedTuple):
    first_frame: int
    frames: int
    width: int
    height: int
    decoded: int


class ShardVideo(NamedTuple):
    """One video to write: its frames are JPEG bytes (any iterable, consumed once)."""

    key: str
    width: int
    height: int
    decoded: int
    jpegs: Iterable[bytes]


def write_shard(
    path: str | os.PathLike, videos: Iterable[ShardVideo]
) -> dict[str, VideoEntry]:
    """Write a shard atomically, streaming the frames; returns its index. Keys must be unique."""
    path = Path(path)
    offsets = [len(HEADER_MAGIC)]
    index: dict[str, VideoEntry] = {}
    with atomic_open(path, "wb") as handle:
        handle.write(HEADER_MAGIC)
        for video in videos:
            if video.key in index:
                raise VclrError(f"{path}: video key {video.key!r} written twice")
            first = len(offsets) - 1
            for jpeg in video.jpegs:
                handle.write(jpeg)
                offsets.append(offsets[-1] + len(jpeg))
            count = len(offsets) - 1 - first
            if count == 0:
                raise VclrError(f"{path}: video {video.key!r} has no frames")
            index[video.key] = VideoEntry(
                first, count, int(video.width), int(video.height), int(video.decoded)
            )
        offsets_bytes = np.asarray(offsets, dtype="<u8").tobytes()
        json_bytes = json.dumps(
            {k: list(v) for k, v in index.items()}, separators=(",", ":")
        ).encode()
        handle.write(offsets_bytes)
        handle.write(json_bytes)
        crc = zlib.crc32(json_bytes, zlib.crc32(offsets_bytes))
        handle.write(_TRAILER.pack(len(json_bytes), len(offsets), crc, TRAILER_MAGIC))
    return index


def _pread_exact(fd: int, size: int, offset: int, path: Path) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise VclrError(
            f"{path}: truncated shard (wanted {size} bytes at offset {offset}, got {len(data)})"
        )
    return data


def read_shard_index(fd: int, path: Path) -> tuple[dict[str, VideoEntry], np.ndarray]:
    """Read and validate a shard's footer from an open file descriptor."""
    file_size = os.fstat(fd).st_size
    if file_size < len(HEADER_MAGIC) + _TRAILER.size:
        raise VclrError(
            f"{path}: not a packed-frames shard or truncated ({file_size} bytes)"
        )
    if _pread_exact(fd, len(HEADER_MAGIC), 0, path) != HEADER_MAGIC:
        raise VclrError(f"{path}: not a packed-frames shard (bad header magic)")
    json_len, offsets_count, crc, magic = _TRAILER.unpack(
        _pread_exact(fd, _TRAILER.size, file_size - _TRAILER.size, path)
    )
    if magic != TRAILER_MAGIC:
        raise VclrError(
            f"{path}: truncated or damaged shard (no trailer magic at the end)"
        )
    footer_len = json_len + 8 * offsets_count
    footer_start = file_size - _TRAILER.size - footer_len
    if offsets_count < 1 or footer_start < len(HEADER_MAGIC):
        raise VclrError(f"{path}: damaged shard (footer sizes do not fit the file)")
    footer = _pread_exact(fd, footer_len, footer_start, path)
    if zlib.crc32(footer) != crc:
        raise VclrError(f"{path}: damaged shard (index checksum mismatch)")
    offsets = np.frombuffer(footer[: 8 * offsets_count], dtype="<u8").astype(np.int64)
    if (
        offsets[0] != len(HEADER_MAGIC)
        or offsets[-1] != footer_start
        or np.any(np.diff(offsets) < 0)
    ):
        raise VclrError(
            f"{path}: damaged shard (frame offsets inconsistent with the file)"
        )
    try:
        raw = json.loads(footer[8 * offsets_count :])
        index = {key: VideoEntry(*map(int, value)) for key, value in raw.items()}
    except (ValueError, TypeError) as error:
        raise VclrError(f"{path}: damaged shard index ({error})") from None
    for key, entry in index.items():
        if (
            entry.frames < 1
            or entry.first_frame < 0
            or entry.first_frame + entry.frames > offsets_count - 1
        ):
            raise VclrError(
                f"{path}: damaged shard index (video {key!r} frames out of range)"
            )
    return index, offsets


def open_shard(
    path: str | os.PathLike,
) -> tuple[int, dict[str, VideoEntry], np.ndarray]:
    """Open a shard for reading: (fd, index, offsets). The caller closes fd."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise VclrError(f"{path}: cannot open shard ({error.strerror})") from None
    try:
        index, offsets = read_shard_index(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, index, offsets


def read_shard_videos(path: str | os.PathLike) -> dict[str, VideoEntry]:
    """Just a shard's index (validated)."""
    fd, index, _ = open_shard(path)
    os.close(fd)
    return index


def iter_shard_jpegs(path: str | os.PathLike, key: str) -> Iterator[bytes]:
    """Stream one video's JPEG frames out of a shard (used to repack a shard without re-extracting)."""
    path = Path(path)
    fd, index, offsets = open_shard(path)
    try:
        entry = index[key]
        for j in range(entry.first_frame, entry.first_frame + entry.frames):
            yield _pread_exact(
                fd, int(offsets[j + 1] - offsets[j]), int(offsets[j]), path
            )
    finally:
        os.close(fd)


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise VclrError(f"{path}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_manifest(manifest, path: Path) -> dict:
    _require(isinstance(manifest, dict), path, "manifest is not a JSON object")
    _require(
        manifest.get("format") == FORMAT,
        path,
        f"format is {manifest.get('format')!r}, expected {FORMAT!r}",
    )
    for field, kind in (
        ("dataset", str),
        ("settings", dict),
        ("shards", list),
        ("videos", dict),
        ("failed", dict),
    ):
        _require(
            isinstance(manifest.get(field), kind),
            path,
            f"key {field!r} missing or not a {kind.__name__}",
        )
    shards = set(manifest["shards"])
    _require(
        all(isinstance(s, str) for s in shards), path, "key 'shards' must list strings"
    )
    for key, video in manifest["videos"].items():
        where = f"videos[{key!r}]"
        _require(isinstance(video, dict), path, f"{where} is not an object")
        _require(
            video.get("shard") in shards,
            path,
            f"{where}.shard {video.get('shard')!r} not in 'shards'",
        )
        for field in ("frames", "decoded", "width", "height"):
            _require(
                _is_int(video.get(field)),
                path,
                f"{where}.{field} missing or not an integer",
            )
        _require(
            video["frames"] >= 1 and 1 <= video["decoded"] <= video["frames"],
            path,
            f"{where}: bad frame counts",
        )
    for key, failure in manifest["failed"].items():
        where = f"failed[{key!r}]"
        _require(isinstance(failure, dict), path, f"{where} is not an object")
        for field in ("source", "reason"):
            _require(
                isinstance(failure.get(field), str),
                path,
                f"{where}.{field} missing or not a string",
            )
    return manifest


def read_manifest(frames_dir: str | os.PathLike) -> dict:
    """The validated manifest.json of a packed-frames directory."""
    path = Path(frames_dir) / "manifest.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VclrError(
            f"{path}: no manifest (run `vclr data extract` first)"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise VclrError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    return validate_manifest(manifest, path)


class PackedFrames:
    """Random access to the frames of a packed-frames directory.

    Shards are opened lazily and per process (the pid is checked), and no file descriptor is pickled,
    so one instance can be handed to DataLoader worker processes (fork or spawn).
    """

    def __init__(self, frames_dir: str | os.PathLike):
        self.frames_dir = Path(frames_dir)
        self.manifest = read_manifest(self.frames_dir)
        self._videos = self.manifest["videos"]
        self._open: dict[str, tuple[int, dict[str, VideoEntry], np.ndarray]] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __del__(self):
        self.close()

    def close(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd, _, _ in self._open.values():
                os.close(fd)
        self._open = {}

    def keys(self) -> list[str]:
        return list(self._videos)

    def __contains__(self, key: str) -> bool:
        return key in self._videos

    def num_frames(self, key: str) -> int:
        return self._video(key)["frames"]

    def size(self, key: str) -> tuple[int, int]:
        """(width, height) of the stored frames."""
        video = self._video(key)
        return video["width"], video["height"]

    def _video(self, key: str) -> dict:
        try:
            return self._videos[key]
        except KeyError:
            raise VclrError(
                f"{self.frames_dir / 'manifest.json'}: no video {key!r}"
            ) from None

    def _shard(self, name: str) -> tuple[int, dict[str, VideoEntry], np.ndarray]:
        if (
            self._pid != os.getpid()
        ):  # forked: descriptors are shared with the parent; open our own
            self._open, self._pid = {}, os.getpid()
        if name not in self._open:
            self._open[name] = open_shard(self.frames_dir / name)
        return self._open[name]

    def read_jpeg(self, key: str, i: int) -> bytes:
        video = self._video(key)
        if not 0 <= i < video["frames"]:
            raise IndexError(
                f"frame {i} out of range for video {key!r} with {video['frames']} frames"
            )
        path = self.frames_dir / video["shard"]
        fd, index, offsets = self._shard(video["shard"])
        entry = index.get(key)
        if entry is None or entry.frames != video["frames"]:
            raise VclrError(
                f"{path}: shard does not hold video {key!r} as the manifest says"
            )
        j = entry.first_frame + i
        return _pread_exact(fd, int(offsets[j + 1] - offsets[j]), int(offsets[j]), path)

    def read_frame(self, key: str, i: int):
        """Frame i of video `key` as a torch.uint8 tensor [3, H, W] (RGB)."""
        return decode_jpeg_bytes(
            self.read_jpeg(key, i),
            f"{self.frames_dir / self._video(key)['shard']}: {key!r} frame {i}",
        )


def decode_jpeg_bytes(data: bytes, where: str):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    _silence_torchvision_codec_deprecation()
    try:
        return decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
        )
    except RuntimeError as error:
        raise VclrError(f"{where}: undecodable JPEG ({error})") from None


@functools.cache
def _silence_torchvision_codec_deprecation() -> None:
    """torchvision 0.29 warns on every call that its image codecs move to TorchCodec; they still work
    and the design pins this version, so silence exactly that message, once per process."""
    warnings.filterwarnings(
        "ignore", message="The image decoding and encoding capabilities of TorchVision"
    )
