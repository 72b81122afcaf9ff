"""`vclr data download`: fetch a dataset's official files, verify them, unpack them into <RAW>.

Layout written (contract 1): <RAW>/annotations/ and <RAW>/videos/ in the official layout, with
<RAW>/.unpacked/*.done stamps. The archives live OUTSIDE <RAW>, in <DOWNLOADS> (default
<RAW>/downloads; the pipeline passes data/downloads/<dataset>): the archives, `.part` files being
resumed, `.corrupt` rejects, files placed by hand, and CHECKSUMS.sha256 (sha256 of every file whose
checksum sources.yaml does not pin, recorded on first download; `sha256sum -c` checks it by hand).
Keeping them apart matters: Snakemake and DVC delete a stage's output folder before rerunning it,
which must never take a half-finished 400 GB download or hand-placed files with it.

What is fetched is declared in sources.yaml (package data, versioned). Login-gated files are
fetched by the user: the command says what to fetch and where to put it, then verifies it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import requests
import urllib3
import yaml
from tqdm import tqdm

from vclr.errors import VclrError
from vclr.io_utils import atomic_write_json, atomic_write_text

DEFAULT_SOURCES = Path(__file__).with_name("sources.yaml")
SOURCES_FORMAT = "vclr-sources/1"
PARTS = ("annotations", "videos", "weights")
ARCHIVE_TYPES = ("zip", "rar", "tar.gz", "tar", "none")
CHECKSUM_ALGORITHMS = ("sha256", "md5")
CHECKSUMS_FILE = "CHECKSUMS.sha256"
VERIFIED_CACHE = ".verified.json"
CHUNK_BYTES = 1 << 20
MAX_NESTING = 3
ERAR_END_ARCHIVE = 10  # unrar's "no more headers" code: anything else ending the walk is damage


# ----------------------------------------------------------------------------- sources.yaml


@dataclass(frozen=True)
class SourceFile:
    """One file to fetch (or, when `manual`, to be placed by the user) and how to unpack it."""

    where: str  # "<sources.yaml>: datasets.X.files[i]" for messages
    name: str
    urls: tuple[str, ...] = ()
    checksums: tuple[tuple[str, str], ...] = ()  # ((algorithm, lowercase hex), ...)
    size: int | None = None
    into: str | None = None  # None: fetched but not unpacked (a URL list)
    subdir: str = ""
    archive: str = "none"
    place_as: str | None = None
    strip_components: int = 0
    nested: str | None = None
    parts: tuple["SourceFile", ...] = ()
    manual: bool = False


@dataclass(frozen=True)
class UrlList:
    """A text file of URLs (Kinetics' k400_*_path.txt); each listed URL becomes a SourceFile."""

    source: SourceFile
    each: dict


@dataclass(frozen=True)
class PlacedVideos:
    """Videos the user places one by one (ActivityNet), listed by an annotation file's ids."""

    where: str
    ids_from: str
    stem: str
    extensions: tuple[str, ...]
    into: str


@dataclass(frozen=True)
class Manual:
    where: str
    site: str
    instructions: str
    files: tuple[SourceFile, ...] = ()
    videos: PlacedVideos | None = None


@dataclass(frozen=True)
class DatasetSources:
    files: tuple[SourceFile, ...]
    url_lists: tuple[UrlList, ...]
    manual: Manual | None


def _expect_mapping(value, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise VclrError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise VclrError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    missing = sorted(required - set(value))
    if missing:
        raise VclrError(f"{where}: missing key(s) {missing}")
    return value


def _expect_str(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise VclrError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _choice(value, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise VclrError(f"{where}: {value!r} is not one of {list(choices)}")
    return value


def _plain_file_name(value, where: str) -> str:
    name = _expect_str(value, where)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise VclrError(f"{where}: {name!r} must be a plain file name, not a path")
    return name


def _checksums(entry: dict, where: str) -> tuple[tuple[str, str], ...]:
    found = []
    for algorithm in CHECKSUM_ALGORITHMS:
        value = entry.get(algorithm)
        if value is None:
            continue
        # md5 may be a published PREFIX (MoCo's model zoo prints 8 digits); sha256 is always whole
        lengths = {"sha256": "64", "md5": "8,32"}[algorithm]
        if not isinstance(value, str) or not re.fullmatch(f"[0-9a-fA-F]{{{lengths}}}", value):
            raise VclrError(f"{where}.{algorithm}: {value!r} is not a hex digest ({lengths} digits)")
        found.append((algorithm, value.lower()))
    return tuple(found)


FILE_KEYS = {"name", "urls", "sha256", "md5", "size", "into", "subdir", "archive", "place_as",
             "strip_components", "nested", "note", "parts"}
UNPACK_KEYS = {"into", "subdir", "archive", "strip_components", "nested"}


def _unpack_settings(entry: dict, where: str) -> dict:
    archive = _choice(entry.get("archive", "none"), f"{where}.archive", ARCHIVE_TYPES)
    nested = entry.get("nested")
    if nested is not None:
        _choice(nested, f"{where}.nested", ("rar",))
        if archive != "rar":
            raise VclrError(f"{where}.nested: nested archives are supported inside rar archives only")
    strip = entry.get("strip_components", 0)
    if not isinstance(strip, int) or isinstance(strip, bool) or strip < 0:
        raise VclrError(f"{where}.strip_components: expected an integer >= 0, got {strip!r}")
    subdir = entry.get("subdir", "") or ""
    if subdir and (not isinstance(subdir, str) or subdir.startswith("/") or ".." in subdir.split("/")):
        raise VclrError(f"{where}.subdir: {subdir!r} must be a relative folder without '..'")
    return {
        "into": _choice(entry.get("into"), f"{where}.into", PARTS),
        "subdir": subdir,
        "archive": archive,
        "strip_components": strip,
        "nested": nested,
    }


def _source_file(entry, where: str, manual: bool) -> SourceFile:
    entry = _expect_mapping(entry, where, FILE_KEYS, {"name", "into"} | (set() if manual else {"urls"}))
    urls = ()
    if not manual:
        raw_urls = entry["urls"]
        if isinstance(raw_urls, str):
            raw_urls = [raw_urls]
        if not isinstance(raw_urls, list) or not raw_urls:
            raise VclrError(f"{where}.urls: expected a non-empty list of URLs")
        urls = tuple(_expect_str(url, f"{where}.urls[{i}]") for i, url in enumerate(raw_urls))
    elif "urls" in entry:
        raise VclrError(f"{where}.urls: a manual file has no URL; describe it in the manual block")
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise VclrError(f"{where}.size: expected a byte count or null, got {size!r}")
    settings = _unpack_settings(entry, where)
    place_as = entry.get("place_as")
    if place_as is not None:
        place_as = _plain_file_name(place_as, f"{where}.place_as")
        if settings["archive"] != "none":
            raise VclrError(f"{where}.place_as: only files with archive: none are placed under a new name")
    parts = ()
    if "parts" in entry:
        if not manual:
            raise VclrError(f"{where}.parts: only manual files are assembled from parts")
        if not isinstance(entry["parts"], list) or not entry["parts"]:
            raise VclrError(f"{where}.parts: expected a non-empty list")
        parts = tuple(
            SourceFile(
                where=f"{where}.parts[{i}]",
                name=_plain_file_name(
                    _expect_mapping(part, f"{where}.parts[{i}]", {"name", "sha256", "md5", "size"}, {"name"})["name"],
                    f"{where}.parts[{i}].name",
                ),
                checksums=_checksums(part, f"{where}.parts[{i}]"),
                size=part.get("size"),
                manual=True,
            )
            for i, part in enumerate(entry["parts"])
        )
        if _checksums(entry, where):
            raise VclrError(f"{where}: checksums of an assembled file belong to its parts")
    return SourceFile(
        where=where,
        name=_plain_file_name(entry["name"], f"{where}.name"),
        urls=urls,
        checksums=_checksums(entry, where),
        size=size,
        place_as=place_as,
        parts=parts,
        manual=manual,
        **settings,
    )


def load_sources(path: str | os.PathLike) -> dict[str, DatasetSources]:
    """Parse and validate a sources.yaml; errors name the file and the offending key."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise VclrError(f"{path}: cannot read the sources file: {error}") from error
    except yaml.YAMLError as error:
        raise VclrError(f"{path}: not valid YAML: {error}") from error
    document = _expect_mapping(document, str(path), {"format", "datasets"}, {"format", "datasets"})
    if document["format"] != SOURCES_FORMAT:
        raise VclrError(f"{path}: format: expected {SOURCES_FORMAT!r}, got {document['format']!r}")
    datasets = document["datasets"]
    if not isinstance(datasets, dict) or not datasets:
        raise VclrError(f"{path}: datasets: expected a mapping of dataset id -> sources")
    parsed = {}
    for dataset, body in datasets.items():
        where = f"{path}: datasets.{dataset}"
        body = _expect_mapping(body, where, {"title", "homepage", "files", "url_lists", "manual"}, {"files"})
        if not isinstance(body["files"], list):
            raise VclrError(f"{where}.files: expected a list")
        files = tuple(_source_file(e, f"{where}.files[{i}]", False) for i, e in enumerate(body["files"]))
        url_lists = []
        for i, entry in enumerate(body.get("url_lists") or []):
            list_where = f"{where}.url_lists[{i}]"
            entry = _expect_mapping(entry, list_where, {"name", "urls", "sha256", "md5", "size", "each"},
                                    {"name", "urls", "each"})
            each = _expect_mapping(entry["each"], f"{list_where}.each", UNPACK_KEYS, {"into", "archive"})
            _unpack_settings(each, f"{list_where}.each")
            listing = _source_file({k: v for k, v in entry.items() if k != "each"} | {"into": "annotations"},
                                   list_where, False)
            url_lists.append(UrlList(source=dataclasses.replace(listing, into=None), each=each))
        manual = None
        if body.get("manual") is not None:
            manual = _manual(body["manual"], f"{where}.manual")
        if not files and not url_lists and manual is None:
            raise VclrError(f"{where}: declares no files, url_lists or manual block")
        names = [f.name for f in files] + [u.source.name for u in url_lists]
        if manual:
            names += [f.name for f in manual.files] + [p.name for f in manual.files for p in f.parts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise VclrError(f"{where}: file name(s) {duplicates} declared twice")
        parsed[dataset] = DatasetSources(files=files, url_lists=tuple(url_lists), manual=manual)
    return parsed


def _manual(block, where: str) -> Manual:
    block = _expect_mapping(block, where, {"site", "instructions", "files", "videos"}, {"site", "instructions"})
    files = tuple(_source_file(e, f"{where}.files[{i}]", True) for i, e in enumerate(block.get("files") or []))
    videos = None
    if block.get("videos") is not None:
        v = _expect_mapping(block["videos"], f"{where}.videos", {"ids_from", "stem", "extensions", "into"},
                            {"ids_from", "stem", "extensions", "into"})
        if "{id}" not in str(v["stem"]):
            raise VclrError(f"{where}.videos.stem: must contain '{{id}}', got {v['stem']!r}")
        if not isinstance(v["extensions"], list) or not v["extensions"]:
            raise VclrError(f"{where}.videos.extensions: expected a non-empty list like [.mp4]")
        videos = PlacedVideos(
            where=f"{where}.videos",
            ids_from=_plain_file_name(v["ids_from"], f"{where}.videos.ids_from"),
            stem=v["stem"],
            extensions=tuple(_expect_str(e, f"{where}.videos.extensions") for e in v["extensions"]),
            into=_choice(v["into"], f"{where}.videos.into", PARTS),
        )
    if not files and videos is None:
        raise VclrError(f"{where}: a manual block needs files or videos")
    return Manual(where=where, site=_expect_str(block["site"], f"{where}.site"),
                  instructions=_expect_str(block["instructions"], f"{where}.instructions"),
                  files=files, videos=videos)


# ----------------------------------------------------------------------------- checksums


@dataclass
class Ledger:
    """Recorded checksums (<DOWNLOADS>/CHECKSUMS.sha256) and a stat cache that spares re-hashing.

    The cache maps a file to (size, mtime_ns, digests): a file whose size or mtime changed since
    it was hashed is hashed again, so a replaced or tampered file is caught on the next run.
    """

    raw: Path  # the downloads folder the ledger covers
    unpacked_into: Path | None = None  # <RAW>, whose .done stamps a rejected file invalidates
    recorded: dict[str, str] = field(default_factory=dict)
    cache: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reverify: bool = False

    def flush(self) -> None:
        lines = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(self.recorded.items()))
        if lines or (self.raw / CHECKSUMS_FILE).exists():
            atomic_write_text(self.raw / CHECKSUMS_FILE, lines)
        atomic_write_json(self.raw / VERIFIED_CACHE, self.cache)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)


def _read_ledger(raw: Path, reverify: bool) -> Ledger:
    ledger = Ledger(raw=raw, reverify=reverify)
    checksums = raw / CHECKSUMS_FILE
    if checksums.exists():
        for number, line in enumerate(checksums.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
            if not match:
                raise VclrError(f"{checksums}: line {number}: expected '<sha256>  <path>', got {line!r}")
            ledger.recorded[match.group(2)] = match.group(1)
    cache = raw / VERIFIED_CACHE
    if cache.exists():
        try:
            ledger.cache = json.loads(cache.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            ledger.cache = {}  # only a cache: losing it costs one re-hash
    return ledger


def _hash_file(path: Path, algorithms: set[str]) -> dict[str, str]:
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _reject(path: Path, entry: SourceFile, what: str, expected, actual, ledger: Ledger, detail: str = "") -> None:
    """Checksum/size mismatch: a downloaded file is moved aside as .corrupt; never unpacked."""
    ledger.cache.pop(path.relative_to(ledger.raw).as_posix(), None)
    if entry.manual:
        action = f"Replace {path} with a good copy (it was placed by hand, so it was left in place)."
    else:
        corrupt = path.with_name(path.name + ".corrupt")
        os.replace(path, corrupt)
        action = f"It was moved aside to {corrupt} and not unpacked; rerun to download it again."
        stamp = _stamp_path(ledger.unpacked_into, entry.name) if ledger.unpacked_into else None
        if stamp is not None and stamp.exists():
            stamp.unlink()  # the unpacked copy came from a file now known bad: redo it next run
    ledger.flush()
    raise VclrError(
        f"{path}: {what} mismatch: expected {expected}, actual {actual} "
        f"(declared at {entry.where}).{detail} {action}"
    )


def verify_file(path: Path, entry: SourceFile, ledger: Ledger) -> str:
    """Check size and checksums of `path` against `entry` (or the recorded sha256); return its sha256."""
    rel = path.relative_to(ledger.raw).as_posix()
    stat = path.stat()
    cached = ledger.cache.get(rel)
    algorithms = {"sha256"} | {algorithm for algorithm, _ in entry.checksums}
    if (not ledger.reverify and cached and cached.get("size") == stat.st_size
            and cached.get("mtime_ns") == stat.st_mtime_ns and algorithms <= set(cached.get("digests", {}))):
        digests = cached["digests"]
    else:
        digests = _hash_file(path, algorithms)
    if entry.size is not None and stat.st_size != entry.size:
        _reject(path, entry, "size", f"{entry.size} bytes", f"{stat.st_size} bytes", ledger)
    for algorithm, expected in entry.checksums:
        if not digests[algorithm].startswith(expected):
            _reject(path, entry, algorithm, expected, digests[algorithm], ledger)
    if not entry.checksums:
        recorded = ledger.recorded.get(rel)
        if recorded is None:
            ledger.recorded[rel] = digests["sha256"]
            ledger.warn(
                f"{path}: no checksum pinned at {entry.where}; recorded sha256 {digests['sha256']} in "
                f"{ledger.raw / CHECKSUMS_FILE} (later runs are checked against it). "
                f"Pin it in sources.yaml: sha256: {digests['sha256']}"
            )
        elif recorded != digests["sha256"]:
            _reject(path, entry, "sha256", recorded, digests["sha256"], ledger,
                    f" The expected value was recorded in {ledger.raw / CHECKSUMS_FILE} on first download;"
                    f" if that first copy was the bad one, delete its line there.")
    ledger.cache[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digests": digests}
    return digests["sha256"]


# ----------------------------------------------------------------------------- HTTP


class _IncompleteTransfer(Exception):
    """The server closed before sending the announced length: worth a retry (resumes)."""


RETRIABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
             urllib3.exceptions.HTTPError, _IncompleteTransfer)


def apply_mirrors(url: str, mirrors: dict[str, str] | None) -> str:
    """Rewrite `url` by the first matching prefix (ORIGINAL_PREFIX -> NEW_PREFIX); paths are kept."""
    for prefix, replacement in (mirrors or {}).items():
        if url.startswith(prefix):
            return replacement + url[len(prefix):]
    return url


def _transfer(session: requests.Session, url: str, part: Path, label: str) -> None:
    """One GET into `part`, resuming with a Range request when `part` already holds bytes."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=(30, 120)) as response:
        if response.status_code == 416 and offset:
            # Nothing left to send: either the .part is complete or it is longer than the file.
            total = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
            if total and int(total.group(1)) == offset:
                return
            part.unlink()
            raise _IncompleteTransfer(f"{label}: partial file did not fit the remote file; restarting")
        response.raise_for_status()
        mode = "wb"
        if response.status_code == 206:
            content_range = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not content_range or int(content_range.group(1)) != offset:
                part.unlink()
                raise _IncompleteTransfer(f"{label}: server resumed at the wrong offset; restarting")
            mode = "ab"
        else:
            offset = 0  # the server ignored the Range header: start over cleanly
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=label, disable=None, file=sys.stderr) as bar:
            # raw bytes: a server that adds Content-Encoding must not change what is checksummed
            for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise _IncompleteTransfer(f"{label}: got {received} of {total} bytes")


def fetch(session: requests.Session, urls: list[str], target: Path, retries: int, backoff_s: float) -> str:
    """Download into `target` via `target.part` (kept between runs for resuming); return the URL used."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        attempt = 0
        while True:
            try:
                _transfer(session, url, part, target.name)
                os.replace(part, target)
                return url
            except requests.HTTPError as error:
                status = error.response.status_code if error.response is not None else None
                if status is not None and (status >= 500 or status == 429) and attempt < retries:
                    attempt += 1
                    time.sleep(min(backoff_s * 2 ** (attempt - 1), 60))
                    continue
                failures.append(f"{url}: HTTP {status}")
                break
            except RETRIABLE as error:
                if attempt < retries:
                    attempt += 1
                    print(f"{target.name}: {error}; retry {attempt}/{retries}", file=sys.stderr)
                    time.sleep(min(backoff_s * 2 ** (attempt - 1), 60))
                    continue
                failures.append(f"{url}: {type(error).__name__}: {error}")
                break
    kept = f" {part.stat().st_size} bytes are kept in {part} and the next run resumes." if part.exists() else ""
    raise VclrError(
        f"{target.name}: download failed from every URL:\n  " + "\n  ".join(failures)
        + f"\n{kept} If the host is gone, point its URL prefix at a mirror with --mirror ORIGINAL=NEW."
    )


# ----------------------------------------------------------------------------- unpacking


def _safe_member(name: str, archive: str, strip: int) -> PurePosixPath | None:
    """The member's path inside the target folder; VclrError for absolute paths and '..'."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"[A-Za-z]:", normalised):
        raise VclrError(f"{archive}: unsafe member path {name!r} (absolute); nothing was unpacked")
    pieces = [piece for piece in normalised.split("/") if piece not in ("", ".")]
    if ".." in pieces:
        raise VclrError(f"{archive}: unsafe member path {name!r} (contains '..'); nothing was unpacked")
    pieces = pieces[strip:]
    return PurePosixPath(*pieces) if pieces else None


def _open_member_target(root: Path, rel: PurePosixPath):
    target = root.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    return open(target, "wb")


def _extract_zip(source: Path, root: Path, strip: int, label: str) -> None:
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                rel = _safe_member(info.filename, label, strip)
                if rel is None:
                    continue
                if info.is_dir():
                    root.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                    continue
                with archive.open(info) as member, _open_member_target(root, rel) as out:
                    shutil.copyfileobj(member, out, CHUNK_BYTES)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise VclrError(f"{label}: not a readable zip archive: {error}") from error


def _extract_tar(stream, root: Path, strip: int, label: str) -> None:
    """Streaming read ('r|*'): works on a pipe of concatenated parts, any compression."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                rel = _safe_member(member.name, label, strip)
                if rel is None:
                    continue
                if member.isdir():
                    root.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    with archive.extractfile(member) as data, _open_member_target(root, rel) as out:
                        shutil.copyfileobj(data, out, CHUNK_BYTES)
                else:
                    raise VclrError(
                        f"{label}: member {member.name!r} is a link or device; only files and folders "
                        f"are unpacked, nothing was unpacked"
                    )
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise VclrError(f"{label}: not a readable tar archive: {error}") from error


def _extract_rar(source: Path, root: Path, strip: int, label: str) -> None:
    """One streaming pass with unrar (via unrar2-cffi's low-level API).

    rarfile.RarFile.read() reopens the archive per member and builds each member in memory; this
    walk writes every member straight to disk, checks unrar's CRCs, and treats a header walk that
    stops before the end-of-archive code as damage (unrar2-cffi's own iterator stops silently).
    """
    from unrar.cffi._unrarlib.lib import RARReadHeaderEx  # type: ignore
    from unrar.cffi.unrarlib import FLAGS_RHDF_DIRECTORY, BadRarFile, RarArchive, RarHeader, RARHeaderDataEx

    try:
        with RarArchive.open_for_processing(str(source)) as rar:
            while True:
                header_data = RARHeaderDataEx()
                code = RARReadHeaderEx(rar.handle, header_data)
                if code == ERAR_END_ARCHIVE:
                    break
                if code != 0:
                    raise VclrError(f"{label}: damaged RAR archive (unrar error {code} reading a header)")
                header = RarHeader(rar, header_data)
                rel = _safe_member(header.FileNameW, label, strip)
                if rel is None or header.Flags & FLAGS_RHDF_DIRECTORY:
                    if rel is not None:
                        root.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                    header.skip()
                    continue
                with _open_member_target(root, rel) as out:
                    header.test(out.write)
    except BadRarFile as error:
        raise VclrError(f"{label}: damaged or unreadable RAR archive: {error.message}") from error


def _unpack_nested_rars(folder: Path, label: str, depth: int = 1) -> None:
    """Unpack every .rar under `folder` into a sibling folder named after it (HMDB51's classes)."""
    inner_archives = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".rar")
    for inner in inner_archives:
        inner_label = f"{label} > {inner.relative_to(folder).as_posix()}"
        if depth > MAX_NESTING:
            raise VclrError(f"{inner_label}: archives nested deeper than {MAX_NESTING} levels")
        destination = inner.with_suffix("")
        scratch = Path(tempfile.mkdtemp(prefix=f".{inner.stem}.", dir=inner.parent))
        try:
            _extract_rar(inner, scratch, 0, inner_label)
            contents = list(scratch.iterdir())
            # <class>.rar usually holds <class>/...: do not make <class>/<class>/
            single = contents[0] if len(contents) == 1 and contents[0].is_dir() else None
            _merge_into(single if single is not None and single.name == destination.name else scratch, destination)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        inner.unlink()
        _unpack_nested_rars(destination, inner_label, depth + 1)


def _merge_into(source: Path, destination: Path) -> None:
    """Move `source`'s contents into `destination` by renames (same file system), merging folders."""
    destination.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        target = destination / child.name
        if child.is_dir() and not child.is_symlink() and target.is_dir():
            _merge_into(child, target)
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(child, target)


class _ConcatenatedReader(io.RawIOBase):
    """The parts read back to back as one stream (`cat part-00 part-01 ... | tar zx`)."""

    def __init__(self, paths: list[Path]):
        self._paths = list(paths)
        self._handle = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._handle is None:
                if not self._paths:
                    return 0
                self._handle = open(self._paths.pop(0), "rb")
            count = self._handle.readinto(buffer)
            if count:
                return count
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        super().close()


def _stamp_path(raw: Path, name: str) -> Path:
    return raw / ".unpacked" / f"{name}.done"


def _link_into(source: Path, target: Path) -> None:
    """Make a hand-placed file appear in <RAW> without a second copy (hard link, else copy)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def unpack(entry: SourceFile, inputs: list[Path], raw: Path) -> Path:
    """Unpack `inputs` (one archive, or the ordered parts of one) into <RAW>/<into>/<subdir>.

    Everything is first written to a scratch folder beside the data; only a complete unpack is
    moved into place (renames), so a failure or an unsafe member leaves nothing behind.
    """
    destination = raw / entry.into / entry.subdir if entry.subdir else raw / entry.into
    label = str(inputs[0]) if len(inputs) == 1 else f"{entry.name} (parts {inputs[0].name}..{inputs[-1].name})"
    scratch = Path(tempfile.mkdtemp(prefix=f".unpack-{Path(entry.name).name}.", dir=raw))
    try:
        if entry.archive == "none":
            shutil.copyfile(inputs[0], scratch / (entry.place_as or entry.name))
        elif entry.archive == "zip":
            _extract_zip(inputs[0], scratch, entry.strip_components, label)
        elif entry.archive == "rar":
            _extract_rar(inputs[0], scratch, entry.strip_components, label)
        else:
            with io.BufferedReader(_ConcatenatedReader(inputs), CHUNK_BYTES) as stream:
                _extract_tar(stream, scratch, entry.strip_components, label)
        if entry.nested == "rar":
            _unpack_nested_rars(scratch, label)
        _merge_into(scratch, destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return destination


# ----------------------------------------------------------------------------- the stage


def _ensure_file(entry: SourceFile, raw: Path, ledger: Ledger, session, mirrors, retries, backoff_s) -> tuple[str, str]:
    """Make sure downloads/<name> is present and verified; return (sha256, how it was obtained)."""
    path = ledger.raw / entry.name
    how = "present"
    if not path.exists():
        urls = [apply_mirrors(url, mirrors) for url in entry.urls]
        used = fetch(session, urls, path, retries, backoff_s)
        how = f"downloaded from {used}"
    digest = verify_file(path, entry, ledger)
    ledger.flush()
    return digest, how


def _process(entry: SourceFile, raw: Path, ledger: Ledger, session, mirrors, retries, backoff_s) -> dict:
    """Fetch (or take the placed copy), verify, unpack; skip what a matching .done stamp covers."""
    stamp = _stamp_path(raw, entry.name)
    stamp_data = json.loads(stamp.read_text(encoding="utf-8")) if stamp.exists() else None
    inputs = [ledger.raw / part.name for part in entry.parts] or [ledger.raw / entry.name]
    if stamp_data is not None and not all(path.exists() for path in inputs):
        return {"status": "up-to-date (archive deleted after unpacking)", "sha256": stamp_data["sha256"]}
    if entry.parts:
        digest = {part.name: verify_file(path, part, ledger) for part, path in zip(entry.parts, inputs)}
        ledger.flush()
        how = "assembled from placed parts"
    elif entry.manual:
        digest = verify_file(inputs[0], entry, ledger)
        ledger.flush()
        how = "placed by hand"
    else:
        digest, how = _ensure_file(entry, raw, ledger, session, mirrors, retries, backoff_s)
    destination_rel = f"{entry.into}/{entry.subdir}".rstrip("/")
    if stamp_data is not None and stamp_data.get("sha256") == digest and stamp_data.get("into") == destination_rel:
        return {"status": "up-to-date", "sha256": digest}
    if stamp.exists():
        stamp.unlink()
    unpack(entry, inputs, raw)
    atomic_write_json(stamp, {"name": entry.name, "sha256": digest, "into": destination_rel,
                              "archive": entry.archive, "declared_at": entry.where})
    return {"status": f"unpacked ({how})", "sha256": digest}


def _listed_files(url_list: UrlList, raw: Path, ledger, session, mirrors, retries, backoff_s) -> list[SourceFile]:
    """Fetch a URL list (checked like any file) and turn every listed URL into a SourceFile."""
    _ensure_file(url_list.source, raw, ledger, session, mirrors, retries, backoff_s)
    listing = ledger.raw / url_list.source.name
    files = []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        name = PurePosixPath(urlsplit(url).path).name
        if not name:
            raise VclrError(f"{listing}: line {number}: no file name in URL {url!r}")
        settings = _unpack_settings(url_list.each, url_list.source.where)
        # Kinetics names every split's tarballs part_N.tar.gz: keep each list's files apart
        stored = f"{Path(url_list.source.name).stem}/{name}"
        files.append(SourceFile(where=f"{listing}: line {number}", name=stored, urls=(url,), **settings))
    if not files:
        raise VclrError(f"{listing}: lists no URLs")
    return files


def _manual_message(dataset: str, manual: Manual, raw: Path, downloads: Path, missing: list[str]) -> str:
    lines = [
        f"{dataset}: these files must be fetched by hand (declared at {manual.where}):",
        f"  site: {manual.site}",
        *("  " + line for line in manual.instructions.splitlines()),
        f"  Place them in {downloads}/ (missing now):",
        *(f"    {name}" for name in missing),
        f"  then rerun: vclr data download --dataset {dataset} --out {raw} --downloads {downloads}",
    ]
    return "\n".join(lines)


def _placed_videos(dataset: str, manual: Manual, raw: Path, ledger: Ledger) -> dict:
    """Check hand-placed videos against the ids of an annotation file; hash them (recorded)."""
    spec = manual.videos
    ids_file = raw / "annotations" / spec.ids_from
    if not ids_file.exists():
        raise VclrError(f"{ids_file}: needed to list the {dataset} videos ({spec.where}); "
                        f"run without --only videos first to fetch the annotations")
    try:
        database = json.loads(ids_file.read_text(encoding="utf-8"))["database"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise VclrError(f"{ids_file}: expected a JSON object with a 'database' mapping ({error})") from error
    folder = ledger.raw / spec.into
    entry = SourceFile(where=spec.where, name=spec.ids_from, manual=True)
    found = 0
    for number, video_id in enumerate(sorted(database), 1):
        stem = spec.stem.format(id=video_id)
        for extension in spec.extensions:
            path = folder / f"{stem}{extension}"
            if path.exists():
                verify_file(path, entry, ledger)
                _link_into(path, raw / spec.into / path.name)
                found += 1
                break
        if number % 500 == 0:
            ledger.flush()
    ledger.flush()
    listed = len(database)
    if found == 0:
        message = _manual_message(dataset, manual, raw, ledger.raw, [])
        raise VclrError(
            message.replace(f"Place them in {ledger.raw}/ (missing now):",
                            f"Place the videos as {folder}/{spec.stem.format(id='<youtube_id>')}"
                            f"{{{','.join(spec.extensions)}}}; none of the {listed} listed in {ids_file} is there.")
        )
    if found < listed:
        ledger.warn(f"{dataset}: {listed - found} of {listed} videos listed in {ids_file} are not in {folder} "
                    f"(missing videos are reported by `vclr data index`)")
    return {"listed": listed, "found": found, "missing": listed - found}


def download_dataset(dataset: str, out_dir: str | os.PathLike, sources_path: str | os.PathLike | None = None,
                     mirrors: dict[str, str] | None = None, only: str | None = None, *, retries: int = 4,
                     backoff_s: float = 2.0, reverify: bool = False,
                     downloads_dir: str | os.PathLike | None = None) -> dict:
    """Fetch, verify and unpack `dataset` into `out_dir` (contract-1 layout); return a report.

    `mirrors` rewrites URLs by prefix; `only` limits the work to "annotations" or "videos";
    `reverify` re-hashes files even when their size and mtime are unchanged; `downloads_dir`
    holds the archives and hand-placed files (default <out_dir>/downloads).
    """
    sources_path = Path(sources_path) if sources_path is not None else DEFAULT_SOURCES
    sources = load_sources(sources_path)
    if dataset not in sources:
        raise VclrError(f"{sources_path}: no dataset {dataset!r} (declared: {', '.join(sorted(sources))})")
    if only is not None and only not in PARTS:
        raise VclrError(f"--only: {only!r} is not one of {list(PARTS)}")
    spec = sources[dataset]
    raw = Path(out_dir)
    downloads = Path(downloads_dir) if downloads_dir is not None else raw / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    raw.mkdir(parents=True, exist_ok=True)
    ledger = _read_ledger(downloads, reverify)
    ledger.unpacked_into = raw
    report = {"dataset": dataset, "raw": str(raw), "sources": str(sources_path), "files": {}, "warnings": ledger.warnings}

    def wanted(into: str | None) -> bool:
        return only is None or into == only

    try:
        with requests.Session() as session:
            session.headers["Accept-Encoding"] = "identity"
            session.headers["User-Agent"] = "vclr-data-download"
            files = [entry for entry in spec.files if wanted(entry.into)]
            for url_list in spec.url_lists:
                if wanted(url_list.each["into"]):
                    files += _listed_files(url_list, raw, ledger, session, mirrors, retries, backoff_s)
            for entry in files:
                report["files"][entry.name] = _process(entry, raw, ledger, session, mirrors, retries, backoff_s)
        manual = spec.manual
        if manual is not None:
            manual_files = [entry for entry in manual.files if wanted(entry.into)]
            missing = []
            for entry in manual_files:
                if _stamp_path(raw, entry.name).exists():
                    continue
                names = [part.name for part in entry.parts] or [entry.name]
                missing += [name for name in names if not (downloads / name).exists()]
            if missing:
                raise VclrError(_manual_message(dataset, manual, raw, downloads, missing))
            for entry in manual_files:
                report["files"][entry.name] = _process(entry, raw, ledger, None, mirrors, retries, backoff_s)
            if manual.videos is not None and wanted(manual.videos.into):
                report["videos"] = _placed_videos(dataset, manual, raw, ledger)
    finally:
        ledger.flush()
    return report


# ----------------------------------------------------------------------------- CLI


def _mirror_argument(text: str) -> tuple[str, str]:
    original, separator, replacement = text.partition("=")
    if not separator or not original or not replacement:
        raise argparse.ArgumentTypeError(f"expected ORIGINAL_PREFIX=NEW_PREFIX, got {text!r}")
    return original, replacement


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset id in the sources file (k400, ucf101, hmdb51, ssv2, anet)")
    parser.add_argument("--out", required=True, type=Path, help="raw dataset folder <RAW> (annotations/, videos/)")
    parser.add_argument("--downloads", type=Path, default=None,
                        help="archives, partial downloads and hand-placed files, kept outside <RAW> (default <RAW>/downloads)")
    parser.add_argument("--sources", type=Path, default=None, help=f"sources YAML (default: the packaged {DEFAULT_SOURCES.name})")
    parser.add_argument("--mirror", action="append", type=_mirror_argument, default=[], metavar="ORIGINAL_PREFIX=NEW_PREFIX",
                        help="fetch URLs starting with ORIGINAL_PREFIX from NEW_PREFIX instead (repeatable)")
    parser.add_argument("--only", choices=PARTS, default=None, help="fetch only the annotations or only the videos")
    parser.add_argument("--retries", type=int, default=4, help="retries per URL on connection errors (default 4)")
    parser.add_argument("--reverify", action="store_true", help="re-hash every file even if unchanged since last verified")


def main(args: argparse.Namespace) -> int:
    report = download_dataset(args.dataset, args.out, args.sources, dict(args.mirror), args.only,
                              retries=args.retries, reverify=args.reverify, downloads_dir=args.downloads)
    for name, result in report["files"].items():
        print(f"{name}: {result['status']}")
    if "videos" in report:
        videos = report["videos"]
        print(f"videos: {videos['found']} of {videos['listed']} found, {videos['missing']} missing")
    print(f"{args.dataset}: ready in {args.out} ({len(report['warnings'])} warning(s))")
    return 0
