"""Tests for the ingest stage: one manifest row per file, safe reading, atomic outputs."""

import hashlib
import io
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ingest import ImageSettings, ingest_source
from modisch.archives import ArchiveLimits

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "replica"
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["ingest"]
LIMITS = ArchiveLimits(
    max_total_bytes=int(PARAMS["archive"]["max_total_bytes"]),
    max_entry_bytes=int(PARAMS["archive"]["max_entry_bytes"]),
    max_ratio=float(PARAMS["archive"]["max_ratio"]),
)
SETTINGS = ImageSettings(
    max_pixels=int(PARAMS["max_pixels"]),
    min_side=int(PARAMS["min_side"]),
    max_side=int(PARAMS["max_side"]),
    jpeg_quality=int(PARAMS["jpeg_quality"]),
)

NFC_NAME = unicodedata.normalize("NFC", "café.jpg")
NFD_NAME = unicodedata.normalize("NFD", "café.jpg")


def encoded(color, image_format="JPEG", size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, image_format)
    return buffer.getvalue()


def png_with_header_only(width: int, height: int) -> bytes:
    """Return a PNG whose header declares ``width`` x ``height`` but contains one row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


GOOD_JPEG = encoded((200, 40, 10))
FAKE_HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64

# (entry name in bad.zip, data, expected status, expected reason)
ZIP_CASES = [
    ("Wrap/Blazer/good.jpg", GOOD_JPEG, "accepted", ""),
    ("Wrap/Blazer/truncated.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2], "rejected", "corrupt"),
    ("Wrap/Blazer/garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "rejected", "corrupt"),
    ("Wrap/Blazer/empty.jpg", b"", "rejected", "empty_file"),
    ("Wrap/Blazer/notes.txt", b"photographed in 2019\n", "skipped", "not_an_image"),
    ("Wrap/Blazer/list.csv", b"file,label\na.jpg,Blazer\n", "skipped", "not_an_image"),
    ("Wrap/Blazer/.DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 32, "skipped", "system_file"),
    ("Wrap/Blazer/Thumbs.db", b"\xd0\xcf\x11\xe0" + b"\x00" * 32, "skipped", "system_file"),
    ("__MACOSX/Wrap/Blazer/._good.jpg", b"\x00\x05\x16\x07" + b"\x00" * 32, "skipped", "system_file"),
    ("Wrap/training/loose.jpg", GOOD_JPEG, "skipped", "no_class_folder"),
    ("loose_root.jpg", GOOD_JPEG, "skipped", "no_class_folder"),
    ("../x.jpg", GOOD_JPEG, "rejected", "path_escape"),
    ("Wrap/Blazer/link.jpg", b"../../etc/passwd", "rejected", "not_regular_file"),
    ("Wrap/Blazer/tiny.jpg", encoded((9, 9, 9), size=(16, 16)), "rejected", "too_small"),
    ("Wrap/Blazer/huge.png", png_with_header_only(10_000, 10_000), "rejected", "too_many_pixels"),
    ("Wrap/Blazer/png_named.jpg", encoded((0, 90, 200), "PNG"), "accepted", "extension_mismatch"),
    ("Wrap/Blazer/photo.heic", FAKE_HEIC, "rejected", "unsupported_format"),
]

# (file path under the folder source, data, expected status, expected reason)
FOLDER_CASES = [
    ("Blazer/good.jpg", encoded((10, 200, 40)), "accepted", ""),
    ("Blazer/truncated.jpg", GOOD_JPEG[:300], "rejected", "corrupt"),
    ("Blazer/empty.jpg", b"", "rejected", "empty_file"),
    ("Blazer/readme.txt", b"hello\n", "skipped", "not_an_image"),
    ("Blazer/.DS_Store", b"\x00\x00\x00\x01Bud1", "skipped", "system_file"),
    ("__MACOSX/Blazer/._good.jpg", b"\x00\x05\x16\x07", "skipped", "system_file"),
    ("validation/loose.jpg", GOOD_JPEG, "skipped", "no_class_folder"),
    ("Blazer/tiny.png", encoded((1, 2, 3), "PNG", size=(8, 40)), "rejected", "too_small"),
    ("Blazer/png_named.jpeg", encoded((90, 0, 200), "PNG"), "accepted", "extension_mismatch"),
    ("Blazer/photo.heic", FAKE_HEIC, "rejected", "unsupported_format"),
]

# Names that must each keep their own stored image: (entry name in names.zip, colour).
NAME_CASES = [
    ("Clothes/Blazer/with space.jpg", (250, 0, 0)),
    ("Clothes/Blazer/ünïcødé 名前.jpg", (0, 250, 0)),
    (f"Clothes/Blazer/{NFC_NAME}", (0, 0, 250)),
    (f"Clothes/Blazer/{NFD_NAME}", (250, 250, 0)),
    ("Clothes/Jaket/same.jpg", (0, 250, 250)),
    ("Clothes/Jaket_Denim/same.jpg", (250, 0, 250)),
]


def build_raw(raw: Path) -> None:
    raw.mkdir(parents=True)
    with zipfile.ZipFile(raw / "bad.zip", "w") as archive:
        for name, data, _, _ in ZIP_CASES:
            info = zipfile.ZipInfo(name)
            if name.endswith("link.jpg"):
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    with zipfile.ZipFile(raw / "names.zip", "w") as archive:
        for name, color in NAME_CASES:
            archive.writestr(name, encoded(color))

    folder = raw / "folder"
    for name, data, _, _ in FOLDER_CASES:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "Blazer" / "link.jpg").symlink_to(folder / "Blazer" / "good.jpg")


def tree_hashes(folder: Path) -> dict[str, str]:
    """Return a SHA-256 per file under ``folder``, symlinks hashed by their target name."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if path.is_symlink():
            hashes[relative] = "link:" + os.readlink(path)
        elif path.is_file():
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """Ingest the generated source once; return (raw dir, out dir, manifest, hashes before)."""
    base = tmp_path_factory.mktemp("ingest")
    raw, out = base / "raw", base / "out"
    build_raw(raw)
    before = tree_hashes(raw)
    manifest = ingest_source("clothes", raw, out, LIMITS, SETTINGS, workers=1)
    return raw, out, manifest, before


def row_for(manifest: pd.DataFrame, path: str) -> pd.Series:
    rows = manifest[manifest["path"] == path]
    assert len(rows) == 1, f"{path}: expected one manifest row, found {len(rows)}"
    return rows.iloc[0]


def check_row(out: Path, row, status: str, reason: str) -> None:
    """Check a manifest row's status and reason, and that only accepted rows have an image."""
    assert row["status"] == status
    assert row["reason"] == reason
    if status == "accepted":
        assert (out / row["image"]).is_file()
    else:
        assert row["image"] == ""


@pytest.mark.parametrize(("name", "data", "status", "reason"), ZIP_CASES,
                         ids=[case[0] for case in ZIP_CASES])
def test_ingest_zip_entry_status(ingested, name, data, status, reason):
    _, out, manifest, _ = ingested

    check_row(out, row_for(manifest, f"bad.zip/{name}"), status, reason)


@pytest.mark.parametrize(("name", "data", "status", "reason"), FOLDER_CASES,
                         ids=[case[0] for case in FOLDER_CASES])
def test_ingest_folder_file_status(ingested, name, data, status, reason):
    _, out, manifest, _ = ingested

    check_row(out, row_for(manifest, f"folder/{name}"), status, reason)


def test_ingest_folder_symlink_rejected(ingested):
    row = row_for(ingested[2], "folder/Blazer/link.jpg")

    assert row["status"] == "rejected"
    assert row["reason"] == "not_regular_file"


def test_ingest_one_row_per_file(ingested):
    raw, out, manifest, _ = ingested
    with zipfile.ZipFile(raw / "bad.zip") as archive:
        bad_entries = len(archive.infolist())
    with zipfile.ZipFile(raw / "names.zip") as archive:
        name_entries = len(archive.infolist())
    folder_files = sum(1 for path in (raw / "folder").rglob("*") if not path.is_dir())

    assert len(manifest) == bad_entries + name_entries + folder_files
    assert manifest["path"].is_unique
    written = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(written["path"]) == list(manifest["path"])
    assert set(written["source"]) == {"clothes"}


def test_ingest_accepted_rows_have_hashes(ingested):
    accepted = ingested[2][ingested[2]["status"] == "accepted"]

    assert (accepted["pixel_sha256"].str.len() == 64).all()
    assert (accepted["phash"].str.len() == 16).all()
    assert (accepted["file_sha256"].str.len() == 64).all()


@pytest.mark.parametrize(("name", "color"), NAME_CASES, ids=[case[0] for case in NAME_CASES])
def test_ingest_names_keep_own_image(ingested, name, color):
    _, out, manifest, _ = ingested

    row = row_for(manifest, f"names.zip/{name}")

    assert row["status"] == "accepted"
    with Image.open(out / row["image"]) as stored:
        mean = np.asarray(stored.convert("RGB"), dtype=float).mean(axis=(0, 1))
    assert np.abs(mean - np.array(color)).max() < 8


def test_ingest_names_distinct_image_files(ingested):
    _, out, manifest, _ = ingested
    rows = manifest[manifest["path"].str.startswith("names.zip/")]

    assert len(rows) == len(NAME_CASES)
    assert rows["image"].is_unique
    assert all((out / image).is_file() for image in rows["image"])
    stored = {path.name for path in (out / "images").iterdir()}
    accepted = manifest[manifest["status"] == "accepted"]
    assert stored == {Path(image).name for image in accepted["image"]}


def test_ingest_labels_same_name_folders(ingested):
    manifest = ingested[2]

    jaket = row_for(manifest, "names.zip/Clothes/Jaket/same.jpg")
    denim = row_for(manifest, "names.zip/Clothes/Jaket_Denim/same.jpg")

    assert (jaket["label"], denim["label"]) == ("Jaket", "Jaket_Denim")


def test_ingest_source_tree_unchanged(ingested):
    raw, _, _, before = ingested

    assert tree_hashes(raw) == before


def test_ingest_no_partial_left(ingested):
    _, out, _, _ = ingested

    assert not out.with_name(out.name + ".partial").exists()


def test_ingest_rerun_byte_identical(ingested, tmp_path):
    raw, out, _, _ = ingested
    first = tree_hashes(out)

    ingest_source("clothes", raw, out, LIMITS, SETTINGS, workers=2)

    assert tree_hashes(out) == first


def test_ingest_missing_raw_exits(tmp_path):
    with pytest.raises(SystemExit, match="fetch stage"):
        ingest_source("clothes", tmp_path / "absent", tmp_path / "out", LIMITS, SETTINGS, 1)


def write_params(path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def test_ingest_killed_leaves_no_finished_output(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    # Links directly in the source folder are followed, so the fixtures are read in place
    # several times over to keep the run long enough to be killed midway.
    for copy in range(4):
        (raw / f"clothes{copy}").symlink_to(FIXTURES / "clothes" / "Clothes_Dataset",
                                            target_is_directory=True)
    out = tmp_path / "ingested" / "clothes"
    partial = out.with_name("clothes.partial")
    params = write_params(tmp_path / "params.yaml")
    before = tree_hashes(FIXTURES)
    command = [sys.executable, str(ROOT / "stages" / "ingest.py"), "--source", "clothes",
               "--params", str(params), "--raw", str(raw), "--out", str(out), "--workers", "1"]

    process = subprocess.Popen(command, cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        images = partial / "images"
        if images.is_dir() and sum(1 for _ in images.iterdir()) >= 20:
            break
        time.sleep(0.05)
    assert process.poll() is None, "ingest finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    assert not out.exists()
    assert sorted(path.name for path in out.parent.iterdir()) == ["clothes.partial"]

    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert finished.returncode == 0, finished.stderr
    assert (out / "manifest.csv").is_file()
    assert not partial.exists()
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 4 * sum(1 for p in (FIXTURES / "clothes").rglob("*") if p.is_file())
    assert (manifest["status"] == "accepted").all()
    assert tree_hashes(FIXTURES) == before
