"""`vclr data download` against a local HTTP server: the REAL URLs are mirrored to 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from support.http_server import serve_files
from support.rar4 import rar4_bytes
from vclr import cli
from vclr.data import download
from vclr.errors import VclrError

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_annotations"
UCF_HOST = "https://www.crcv.ucf.edu/"
HMDB_HOST = "http://serre-lab.clps.brown.edu/"
S3_HOST = "https://s3.amazonaws.com/"
UCF_RAR_PATH = "/data/UCF101/UCF101.rar"
UCF_SPLITS_PATH = "/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip"
UCF_SPLIT_FILES = ["classInd.txt"] + [f"{kind}list0{i}.txt" for kind in ("train", "test") for i in (1, 2, 3)]
UCF_VIDEOS = {
    "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi": b"RIFF-fake-avi-1" * 200,
    "UCF-101/HandstandPushups/v_HandStandPushups_g01_c01.avi": b"RIFF-fake-avi-2" * 300,
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ucf_fixture() -> dict[str, bytes]:
    splits = zip_bytes({f"ucfTrainTestlist/{name}": (REAL / "ucf101" / name).read_bytes() for name in UCF_SPLIT_FILES})
    return {UCF_RAR_PATH: rar4_bytes(UCF_VIDEOS, directories=("UCF-101",)), UCF_SPLITS_PATH: splits}


def sources_copy(tmp_path: Path, edit) -> Path:
    """A test copy of the packaged sources.yaml, changed by `edit(document)`."""
    document = yaml.safe_load(download.DEFAULT_SOURCES.read_text(encoding="utf-8"))
    edit(document)
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def pin_ucf(document: dict, files: dict[str, bytes], splits_sha256: str | None = None) -> None:
    rar, splits = document["datasets"]["ucf101"]["files"]
    rar.update(sha256=sha256(files[UCF_RAR_PATH]), md5=None, size=len(files[UCF_RAR_PATH]))
    splits.update(sha256=splits_sha256 or sha256(files[UCF_SPLITS_PATH]), size=None)


# ----------------------------------------------------------------------------- sources.yaml


def test_packaged_sources_cover_all_five_datasets_with_urls_or_manual_blocks():
    sources = download.load_sources(download.DEFAULT_SOURCES)
    assert set(sources) == {"k400", "ucf101", "hmdb51", "ssv2", "anet", "moco_v2"}
    for dataset, spec in sources.items():
        for entry in spec.files:
            assert entry.urls and all(url.startswith("http") for url in entry.urls), (dataset, entry.name)
        assert spec.files or spec.url_lists or spec.manual, dataset
    ucf_splits = sources["ucf101"].files[1]
    assert ucf_splits.checksums == (("sha256", "5c0d1a53b8ed364a2ac830a73f405e51bece7d98ce1254fd19ed4a36b224bd27"),)
    assert ucf_splits.size == 113943
    assert sources["hmdb51"].files[0].nested == "rar" and len(sources["hmdb51"].files[0].urls) >= 2
    assert [u.each["subdir"] for u in sources["k400"].url_lists] == ["train", "val", "test"]
    parts = sources["ssv2"].manual.files[1].parts
    assert [p.name for p in parts] == [f"20bn-something-something-v2-{i:02d}" for i in range(20)]
    assert sources["anet"].manual.videos.ids_from == "activity_net.v1-3.min.json"


def test_moco_weights_are_checked_against_the_published_md5_prefix(tmp_path):
    weights = b"not really a checkpoint, but the bytes are what is checked"
    path = "/moco/moco_checkpoints/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar"
    prefix = hashlib.md5(weights).hexdigest()[:8]
    out, downloads = tmp_path / "weights", tmp_path / "downloads"
    with serve_files({path: weights}) as server:
        mirror = {"https://dl.fbaipublicfiles.com/": server.url + "/"}
        good = sources_copy(tmp_path, lambda d: d["datasets"]["moco_v2"]["files"][0].update(md5=prefix))
        download.download_dataset("moco_v2", out, good, mirror, downloads_dir=downloads)
        assert (out / "weights/moco_v2_200ep_pretrain.pth.tar").read_bytes() == weights
        wrong = "0" * 8 if prefix != "0" * 8 else "1" * 8
        bad = sources_copy(tmp_path, lambda d: d["datasets"]["moco_v2"]["files"][0].update(md5=wrong))
        with pytest.raises(VclrError, match=rf"md5 mismatch: expected {wrong}"):
            download.download_dataset("moco_v2", tmp_path / "again", bad, mirror,
                                      downloads_dir=tmp_path / "downloads2")


def test_sources_errors_name_the_file_and_key(tmp_path):
    path = sources_copy(tmp_path, lambda d: d["datasets"]["ucf101"]["files"][0].update(archive="rar5"))
    with pytest.raises(VclrError, match=r"sources\.yaml: datasets\.ucf101\.files\[0\]\.archive: 'rar5'"):
        download.load_sources(path)
    path = sources_copy(tmp_path, lambda d: d["datasets"]["hmdb51"]["files"][1].pop("urls"))
    with pytest.raises(VclrError, match=r"datasets\.hmdb51\.files\[1\]: missing key\(s\) \['urls'\]"):
        download.load_sources(path)


# ----------------------------------------------------------------------------- success paths


def test_ucf101_real_urls_mirrored_unpack_into_contract_layout_and_rerun_skips(tmp_path):
    files = ucf_fixture()
    sources = sources_copy(tmp_path, lambda d: pin_ucf(d, files))
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        argv = ["data", "download", "--dataset", "ucf101", "--out", str(raw), "--sources", str(sources),
                "--mirror", f"{UCF_HOST}={server.url}/"]
        assert cli.main(argv) == 0
        for name in UCF_SPLIT_FILES:  # byte-exact, CRLF kept
            assert (raw / "annotations/ucfTrainTestlist" / name).read_bytes() == (REAL / "ucf101" / name).read_bytes()
        for member, data in UCF_VIDEOS.items():
            assert (raw / "videos" / member).read_bytes() == data
        assert (raw / ".unpacked/UCF101.rar.done").exists()
        assert not list(raw.glob(".unpack-*")) and not list((raw / "downloads").glob("*.part"))
        requests_before = len(server.requests)
        report = download.download_dataset("ucf101", raw, sources, {UCF_HOST: server.url + "/"})
        assert len(server.requests) == requests_before  # nothing fetched again
        assert {r["status"] for r in report["files"].values()} == {"up-to-date"}


def test_deleted_raw_folder_is_rebuilt_from_the_separate_downloads_folder(tmp_path):
    """Snakemake and DVC delete a stage's output before rerunning it: the archives must survive."""
    files = ucf_fixture()
    sources = sources_copy(tmp_path, lambda d: pin_ucf(d, files))
    raw, downloads = tmp_path / "data/raw/ucf101", tmp_path / "data/downloads/ucf101"
    with serve_files(files) as server:
        mirror = {UCF_HOST: server.url + "/"}
        download.download_dataset("ucf101", raw, sources, mirror, downloads_dir=downloads)
        assert (downloads / "UCF101.rar").exists() and not (raw / "downloads").exists()
        shutil.rmtree(raw)
        requests_before = len(server.requests)
        report = download.download_dataset("ucf101", raw, sources, mirror, downloads_dir=downloads)
        assert len(server.requests) == requests_before
    assert {r["status"] for r in report["files"].values()} == {"unpacked (present)"}
    for member, data in UCF_VIDEOS.items():
        assert (raw / "videos" / member).read_bytes() == data


def test_hmdb51_nested_rars_unpack_into_class_folders(tmp_path):
    split_name = "brush_hair_test_split1.txt"
    split_bytes = (REAL / "hmdb51" / split_name).read_bytes()
    inner = {
        "brush_hair.rar": rar4_bytes({"brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi": b"avi-a" * 50}),
        "cartwheel.rar": rar4_bytes({"cartwheel/Bodenturnen_2004_cartwheel_f_cm_np1_le_med_0.avi": b"avi-b" * 70}),
    }
    files = {
        "/wp-content/uploads/2013/10/hmdb51_org.rar": rar4_bytes(inner),
        "/wp-content/uploads/2013/10/test_train_splits.rar": rar4_bytes(
            {f"testTrainMulti_7030_splits/{split_name}": split_bytes}),
    }
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        report = download.download_dataset("hmdb51", raw, mirrors={HMDB_HOST: server.url + "/"})
    videos = raw / "videos"
    assert (videos / "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi").read_bytes() == b"avi-a" * 50
    assert (videos / "cartwheel/Bodenturnen_2004_cartwheel_f_cm_np1_le_med_0.avi").read_bytes() == b"avi-b" * 70
    assert sorted(p.name for p in videos.iterdir()) == ["brush_hair", "cartwheel"]  # no .rar left, no nesting
    assert (raw / "annotations/testTrainMulti_7030_splits" / split_name).read_bytes() == split_bytes
    # no pinned checksums for HMDB51: both recorded, with a warning saying what to pin
    recorded = (raw / "downloads/CHECKSUMS.sha256").read_text()
    assert f"{sha256(files['/wp-content/uploads/2013/10/hmdb51_org.rar'])}  hmdb51_org.rar\n" in recorded
    assert any("Pin it in sources.yaml" in w for w in report["warnings"])


def test_k400_url_lists_and_tar_gz_parts(tmp_path):
    def clips(*names):
        return {f"{name}.mp4": name.encode() * 20 for name in names}

    tarballs = {
        "/kinetics/400/train/part_0.tar.gz": clips("abc_000010_000020", "a b'(c)_000001_000011"),
        "/kinetics/400/train/part_1.tar.gz": clips("xyz_000000_000010"),
        "/kinetics/400/val/part_0.tar.gz": clips("val_000005_000015"),
        "/kinetics/400/test/part_0.tar.gz": clips("tst_000005_000015"),
    }
    files = {path: tar_gz_bytes(members) for path, members in tarballs.items()}
    for split in ("train", "val", "test"):
        listed = [f"{S3_HOST}{p.lstrip('/')}" for p in tarballs if p.startswith(f"/kinetics/400/{split}/")]
        files[f"/kinetics/400/{split}/k400_{split}_path.txt"] = ("\n".join(listed) + "\n").encode()
    val_csv = (REAL / "kinetics400/kinetics-400_val.csv").read_bytes()
    files["/kinetics/400/annotations/train.csv"] = b"label,youtube_id,time_start,time_end,split,is_cc\n"
    files["/kinetics/400/annotations/val.csv"] = val_csv
    files["/kinetics/400/annotations/test.csv"] = b"label,youtube_id,time_start,time_end,split,is_cc\n"
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        report = download.download_dataset("k400", raw, mirrors={S3_HOST: server.url + "/"})
    assert (raw / "annotations/validate.csv").read_bytes() == val_csv
    assert (raw / "annotations/train.csv").exists() and (raw / "annotations/test.csv").exists()
    for path, members in tarballs.items():
        split = path.split("/")[3]
        for name, data in members.items():
            assert (raw / "videos" / split / name).read_bytes() == data
    assert sorted(p.name for p in (raw / "videos/train").iterdir()) == [
        "a b'(c)_000001_000011.mp4", "abc_000010_000020.mp4", "xyz_000000_000010.mp4"]
    assert report["files"]["k400_train_path/part_1.tar.gz"]["status"].startswith("unpacked")
    assert len((raw / "downloads/CHECKSUMS.sha256").read_text().splitlines()) == 3 + 3 + 4  # lists, csvs, tarballs


def test_anet_annotations_download_and_placed_videos_are_counted(tmp_path):
    database = {"database": {"abc": {"subset": "training"}, "def": {"subset": "validation"}}}
    files = {"/files/activity_net.v1-3.min.json": json.dumps(database).encode()}
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        mirror = {"http://ec2-52-25-205-214.us-west-2.compute.amazonaws.com/": server.url + "/"}
        with pytest.raises(VclrError, match=r"v_<youtube_id>\{\.mp4,\.mkv,\.webm\}; none of the 2 listed"):
            download.download_dataset("anet", raw, mirrors=mirror)
        assert (raw / "annotations/activity_net.v1-3.min.json").exists()
        (raw / "downloads/videos").mkdir()
        (raw / "downloads/videos/v_def.mkv").write_bytes(b"video")
        report = download.download_dataset("anet", raw, mirrors=mirror)
    assert report["videos"] == {"listed": 2, "found": 1, "missing": 1}
    assert (raw / "videos/v_def.mkv").read_bytes() == b"video"  # placed outside <RAW>, appears inside
    assert f"{sha256(b'video')}  videos/v_def.mkv" in (raw / "downloads/CHECKSUMS.sha256").read_text()


# ----------------------------------------------------------------------------- failures


def test_checksum_mismatch_names_file_expected_actual_and_unpacks_nothing(tmp_path):
    files = ucf_fixture()
    wrong = "0" * 64
    sources = sources_copy(tmp_path, lambda d: pin_ucf(d, files, splits_sha256=wrong))
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        with pytest.raises(VclrError) as caught:
            download.download_dataset("ucf101", raw, sources, {UCF_HOST: server.url + "/"}, only="annotations")
    message = str(caught.value)
    assert "UCF101TrainTestSplits-RecognitionTask.zip" in message
    assert wrong in message and sha256(files[UCF_SPLITS_PATH]) in message
    assert (raw / "downloads/UCF101TrainTestSplits-RecognitionTask.zip.corrupt").exists()
    assert not (raw / "downloads/UCF101TrainTestSplits-RecognitionTask.zip").exists()
    assert not (raw / "annotations").exists()


def test_interrupted_transfer_resumes_with_a_range_request(tmp_path):
    files = ucf_fixture()
    sources = sources_copy(tmp_path, lambda d: pin_ucf(d, files))
    raw = tmp_path / "raw"
    cut = 1000
    with serve_files(files) as server:
        server.cut_after[UCF_RAR_PATH] = cut
        mirrors = {UCF_HOST: server.url + "/"}
        with pytest.raises(VclrError, match="download failed from every URL"):
            download.download_dataset("ucf101", raw, sources, mirrors, only="videos", retries=0)
        assert (raw / "downloads/UCF101.rar.part").stat().st_size == cut
        assert not (raw / "videos").exists()
        download.download_dataset("ucf101", raw, sources, mirrors, only="videos", retries=0)
        seen = server.requests_for(UCF_RAR_PATH)
    assert [(r["range"], r["status"]) for r in seen] == [(None, 200), (f"bytes={cut}-", 206)]
    for member, data in UCF_VIDEOS.items():
        assert (raw / "videos" / member).read_bytes() == data


def test_retry_within_one_run_resumes_after_a_dropped_connection(tmp_path):
    files = ucf_fixture()
    sources = sources_copy(tmp_path, lambda d: pin_ucf(d, files))
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        server.cut_after[UCF_RAR_PATH] = 777
        download.download_dataset("ucf101", raw, sources, {UCF_HOST: server.url + "/"}, only="videos",
                                  retries=2, backoff_s=0)
        assert [r["range"] for r in server.requests_for(UCF_RAR_PATH)] == [None, "bytes=777-"]
    assert (raw / "videos" / next(iter(UCF_VIDEOS))).exists()


def test_server_without_range_support_restarts_from_zero_and_verifies(tmp_path):
    files = ucf_fixture()
    sources = sources_copy(tmp_path, lambda d: pin_ucf(d, files))
    raw = tmp_path / "raw"
    with serve_files(files, supports_range=False) as server:
        server.cut_after[UCF_RAR_PATH] = 1000
        mirrors = {UCF_HOST: server.url + "/"}
        with pytest.raises(VclrError):
            download.download_dataset("ucf101", raw, sources, mirrors, only="videos", retries=0)
        download.download_dataset("ucf101", raw, sources, mirrors, only="videos", retries=0)
        seen = server.requests_for(UCF_RAR_PATH)
    assert [(r["range"], r["status"]) for r in seen] == [(None, 200), ("bytes=1000-", 200)]
    assert (raw / "downloads/UCF101.rar").read_bytes() == files[UCF_RAR_PATH]  # not appended twice
    assert (raw / ".unpacked/UCF101.rar.done").exists()


def test_unknown_checksum_is_recorded_then_a_tampered_file_is_detected(tmp_path):
    files = ucf_fixture()

    def unpin(document):
        for entry in document["datasets"]["ucf101"]["files"]:
            entry.update(sha256=None, md5=None, size=None)

    sources = sources_copy(tmp_path, unpin)
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        mirrors = {UCF_HOST: server.url + "/"}
        report = download.download_dataset("ucf101", raw, sources, mirrors, only="annotations")
        good = sha256(files[UCF_SPLITS_PATH])
        assert (raw / "downloads/CHECKSUMS.sha256").read_text() == f"{good}  UCF101TrainTestSplits-RecognitionTask.zip\n"
        assert any(good in w for w in report["warnings"])
        download.download_dataset("ucf101", raw, sources, mirrors, only="annotations")  # unchanged: passes
        archive = raw / "downloads/UCF101TrainTestSplits-RecognitionTask.zip"
        archive.write_bytes(archive.read_bytes()[:-10] + b"tampered!!")
        with pytest.raises(VclrError, match=rf"sha256 mismatch: expected {good}.*recorded in .*CHECKSUMS\.sha256"):
            download.download_dataset("ucf101", raw, sources, mirrors, only="annotations")
        assert archive.with_name(archive.name + ".corrupt").exists()
        assert not (raw / ".unpacked/UCF101TrainTestSplits-RecognitionTask.zip.done").exists()
        download.download_dataset("ucf101", raw, sources, mirrors, only="annotations")  # fetched again, verified
    assert archive.read_bytes() == files[UCF_SPLITS_PATH]


def test_unsafe_tar_member_is_rejected_and_nothing_is_unpacked(tmp_path):
    evil = tar_gz_bytes({"ok_000000_000010.mp4": b"fine", "../../escaped.mp4": b"evil"})
    files = {"/kinetics/400/train/k400_train_path.txt": f"{S3_HOST}kinetics/400/train/part_0.tar.gz\n".encode(),
             "/kinetics/400/train/part_0.tar.gz": evil}
    sources = sources_copy(tmp_path, lambda d: d["datasets"]["k400"].update(
        url_lists=d["datasets"]["k400"]["url_lists"][:1]))
    raw = tmp_path / "raw"
    with serve_files(files) as server:
        with pytest.raises(VclrError, match=r"part_0\.tar\.gz: unsafe member path '\.\./\.\./escaped\.mp4'"):
            download.download_dataset("k400", raw, sources, {S3_HOST: server.url + "/"}, only="videos")
    assert not (tmp_path / "escaped.mp4").exists() and not (raw / "escaped.mp4").exists()
    assert not (raw / "videos").exists() and not list(raw.glob(".unpack-*"))


def test_damaged_rar_is_an_error_and_leaves_no_partial_unpack(tmp_path):
    archive = tmp_path / "downloads" / "UCF101.rar"
    archive.parent.mkdir()
    whole = rar4_bytes(UCF_VIDEOS)
    archive.write_bytes(whole[: len(whole) - 200])  # second member cut short
    entry = download.SourceFile(where="test", name="UCF101.rar", into="videos", archive="rar")
    with pytest.raises(VclrError, match="UCF101.rar"):
        download.unpack(entry, [archive], tmp_path)
    assert not (tmp_path / "videos").exists()


# ----------------------------------------------------------------------------- manual datasets


def ssv2_fixture() -> tuple[dict[str, bytes], dict[str, bytes]]:
    videos = {f"20bn-something-something-v2/{i}.webm": random.Random(i).randbytes(1500) for i in (1, 2, 78687)}
    whole = tar_gz_bytes(videos)
    cuts = [len(whole) * i // 20 for i in range(21)]
    parts = {f"20bn-something-something-v2-{i:02d}": whole[cuts[i]:cuts[i + 1]] for i in range(20)}
    labels = {"labels.json": b'{"Holding something": "0"}', "train.json": b"[]", "validation.json": b"[]",
              "test.json": b'[{"id": "1"}]'}
    placed = dict(parts)
    placed["20bn-something-something-download-package-labels.zip"] = zip_bytes(
        {f"labels/{name}": data for name, data in labels.items()})
    return placed, videos | {f"labels/{name}": data for name, data in labels.items()}


def test_manual_ssv2_without_files_says_what_to_fetch_and_where(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert cli.main(["data", "download", "--dataset", "ssv2", "--out", str(raw)]) == 2
    message = capsys.readouterr().err
    assert "https://www.qualcomm.com/developer/software/something-something-v-2-dataset" in message
    assert f"Place them in {raw / 'downloads'}/" in message
    assert "20bn-something-something-download-package-labels.zip" in message
    assert all(f"20bn-something-something-v2-{i:02d}" in message for i in range(20))


def test_manual_ssv2_placed_parts_are_verified_concatenated_in_order_and_unpacked(tmp_path):
    placed, expected = ssv2_fixture()
    raw = tmp_path / "raw"
    (raw / "downloads").mkdir(parents=True)
    for name, data in placed.items():
        (raw / "downloads" / name).write_bytes(data)
    report = download.download_dataset("ssv2", raw)
    for member, data in expected.items():
        target = raw / "annotations" / member.removeprefix("labels/") if member.startswith("labels/") else raw / "videos" / member
        assert target.read_bytes() == data
    assert len((raw / "downloads/CHECKSUMS.sha256").read_text().splitlines()) == 21
    assert report["files"]["20bn-something-something-v2.tar.gz"]["status"] == "unpacked (assembled from placed parts)"
    assert download.download_dataset("ssv2", raw)["files"]["20bn-something-something-v2.tar.gz"]["status"] == "up-to-date"
    # a part replaced by a different copy no longer matches what was recorded: named, left in place
    part = raw / "downloads/20bn-something-something-v2-07"
    part.write_bytes(b"x" + part.read_bytes())
    with pytest.raises(VclrError, match=r"20bn-something-something-v2-07: sha256 mismatch.*placed by hand"):
        download.download_dataset("ssv2", raw)
    assert part.exists()
