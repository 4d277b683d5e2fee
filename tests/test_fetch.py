"""Tests for stages/fetch.py: local sources in process, Kaggle downloads end to end.

Kaggle tests run the stage script in a subprocess against the fake server in
fake_kaggle.py. A subprocess is needed because the kaggle package authenticates when it is
first imported. ``KaggleApi`` also fixes its config folder and endpoint in class attributes
at import time, so an in-process import would keep the state of whichever test came first.

Endpoint seam: ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` makes the client call
http://localhost (``KaggleApi.args`` gains ``--local``), and ``HTTP_PROXY`` makes requests
send those calls through the fake server on a free loopback port. kagglesdk has no variable
that sets the endpoint URL itself, and its ``TEST`` environment is fixed to port 7777, which
may be taken.
"""

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from fake_kaggle import start_fake_kaggle, stop_fake_kaggle

import fetch

ROOT = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = ROOT / "stages" / "fetch.py"

SLUG = "owner/tiny-clothes"
USERNAME = "tester"
KEY = "0123456789abcdef"
TOKEN = "KGAT_fake_access_token"


def make_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("Kaos/one.jpg", b"\xff\xd8 fake jpeg one")
        zf.writestr("Rok/two.jpg", b"\xff\xd8 fake jpeg two")
    return buffer.getvalue()


DATASET_ZIP = make_zip()


def tree_digest(root: Path) -> dict[str, str]:
    """Map each entry under ``root`` to a hash of its content, or of its link target."""
    digest = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            digest[relative] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[relative] = "dir"
    return digest


def leftover_temp_folders(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# Local sources, in process


def fetch_local(local_path: Path, out: Path) -> None:
    fetch.fetch_source(
        "clothes", SLUG, str(local_path), out, retries=0, backoff_seconds=0, timeout_seconds=1
    )


def make_source_folder(root: Path) -> Path:
    folder = root / "clothes-src"
    (folder / "Kaos").mkdir(parents=True)
    (folder / "Kaos" / "one.jpg").write_bytes(b"\xff\xd8 one")
    (folder / "Rok").mkdir()
    (folder / "Rok" / "two.jpg").write_bytes(b"\xff\xd8 two")
    outside = root / "outside.jpg"
    outside.write_bytes(b"\xff\xd8 outside the source")
    (folder / "Kaos" / "link.jpg").symlink_to(outside)
    return folder


def make_tar_gz(root: Path) -> Path:
    archive = root / "clothes.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"\xff\xd8 one"
        info = tarfile.TarInfo("Kaos/one.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return archive


def make_zip_file(root: Path) -> Path:
    archive = root / "clothes.zip"
    archive.write_bytes(DATASET_ZIP)
    return archive


@pytest.mark.parametrize("make_archive", [make_zip_file, make_tar_gz], ids=["zip", "tar.gz"])
def test_local_archive_copied_byte_for_byte(tmp_path, make_archive):
    source = make_archive(tmp_path)
    before = source.read_bytes()
    out = tmp_path / "data" / "raw" / "clothes"

    fetch_local(source, out)

    assert sorted(p.name for p in out.iterdir()) == [source.name]
    assert (out / source.name).read_bytes() == before
    assert source.read_bytes() == before
    assert leftover_temp_folders(out.parent) == []


def test_local_folder_copied_without_symlinks(tmp_path, caplog):
    source = make_source_folder(tmp_path)
    before = tree_digest(source)
    out = tmp_path / "data" / "raw" / "clothes"

    with caplog.at_level(logging.WARNING, logger="fetch"):
        fetch_local(source, out)

    copy = out / source.name
    assert (copy / "Kaos" / "one.jpg").read_bytes() == b"\xff\xd8 one"
    assert (copy / "Rok" / "two.jpg").read_bytes() == b"\xff\xd8 two"
    assert not (copy / "Kaos" / "link.jpg").exists()
    assert not (copy / "Kaos" / "link.jpg").is_symlink()
    assert any("link.jpg" in record.getMessage() for record in caplog.records)
    assert tree_digest(source) == before
    assert leftover_temp_folders(out.parent) == []


def test_local_source_replaces_older_output(tmp_path):
    source = make_zip_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older fetch")

    fetch_local(source, out)

    assert sorted(p.name for p in out.iterdir()) == ["clothes.zip"]
    assert leftover_temp_folders(tmp_path) == []


def test_local_source_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "clothes.zip"
    out = tmp_path / "out"

    with pytest.raises(SystemExit) as excinfo:
        fetch_local(missing, out)

    message = str(excinfo.value)
    assert str(missing) in message
    assert "sources.clothes.path" in message
    assert "null" in message
    assert not out.exists()


def test_local_source_unsupported_file(tmp_path):
    source = tmp_path / "clothes.rar"
    source.write_bytes(b"Rar!")

    with pytest.raises(SystemExit, match="not a supported archive"):
        fetch_local(source, tmp_path / "out")


def test_local_source_inside_output_rejected(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    source = make_zip_file(out)

    with pytest.raises(SystemExit, match="overlaps the output folder"):
        fetch_local(source, out)

    assert source.read_bytes() == DATASET_ZIP


def test_cli_local_source_relative_path(tmp_path, monkeypatch):
    make_zip_file(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "sources": {"clothes": {"kaggle": SLUG, "path": "clothes.zip"}},
                "fetch": {"retries": 0, "backoff_seconds": 0, "timeout_seconds": 1},
            }
        )
    )
    monkeypatch.chdir(tmp_path)

    fetch.main(["--source", "clothes", "--params", str(params)])

    assert (tmp_path / "data" / "raw" / "clothes" / "clothes.zip").read_bytes() == DATASET_ZIP


# Kaggle downloads, in a subprocess against the fake server


@pytest.fixture
def fake_kaggle():
    server = start_fake_kaggle({SLUG: DATASET_ZIP}, USERNAME, KEY, TOKEN)
    yield server
    stop_fake_kaggle(server)


@pytest.fixture
def kaggle_env(tmp_path, monkeypatch, fake_kaggle):
    """Isolate credentials and route the kaggle client to the fake; return the config folder."""
    home = tmp_path / "home"
    home.mkdir()
    config_dir = tmp_path / "kaggle-config"
    config_dir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for name in list(os.environ):
        if name.startswith("KAGGLE_") and name != "KAGGLE_CONFIG_DIR":
            monkeypatch.delenv(name)
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("HTTP_PROXY", fake_kaggle.url)
    monkeypatch.setenv("http_proxy", fake_kaggle.url)
    return config_dir


def write_kaggle_json(config_dir: Path, username: str = USERNAME, key: str = KEY) -> None:
    path = config_dir / "kaggle.json"
    path.write_text(json.dumps({"username": username, "key": key}))
    path.chmod(0o600)


def run_fetch(tmp_path: Path, slug: str = SLUG, retries: int = 2) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "sources": {"clothes": {"kaggle": slug, "path": None}},
                "fetch": {"retries": retries, "backoff_seconds": 0.05, "timeout_seconds": 0.5},
            }
        )
    )
    command = [
        sys.executable, str(FETCH_SCRIPT),
        "--source", "clothes",
        "--params", str(params),
        "--out", str(tmp_path / "raw" / "clothes"),
    ]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_kaggle_download_success(tmp_path, kaggle_env, fake_kaggle):
    write_kaggle_json(kaggle_env)

    result = run_fetch(tmp_path)

    assert result.returncode == 0, result.stderr
    out = tmp_path / "raw" / "clothes"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-clothes.zip"]
    assert (out / "tiny-clothes.zip").read_bytes() == DATASET_ZIP
    assert fake_kaggle.download_requests == [{"ownerSlug": "owner", "datasetSlug": "tiny-clothes"}]
    assert "Fetched source clothes: 1 files" in result.stderr
    assert leftover_temp_folders(out.parent) == []


@pytest.mark.parametrize(
    "variables",
    [{"KAGGLE_USERNAME": USERNAME, "KAGGLE_KEY": KEY}, {"KAGGLE_API_TOKEN": TOKEN}],
    ids=["username-key", "api-token"],
)
def test_kaggle_credentials_from_env(tmp_path, kaggle_env, monkeypatch, variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    result = run_fetch(tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "raw" / "clothes" / "tiny-clothes.zip").read_bytes() == DATASET_ZIP


def test_kaggle_missing_credentials(tmp_path, kaggle_env, fake_kaggle):
    result = run_fetch(tmp_path)

    assert result.returncode == 1
    assert SLUG in result.stderr
    assert "no valid Kaggle credentials found" in result.stderr
    assert "kaggle.json" in result.stderr
    assert "KAGGLE_USERNAME" in result.stderr
    assert "sources.clothes.path" in result.stderr
    assert fake_kaggle.download_requests == []


def test_kaggle_rejected_api_token(tmp_path, kaggle_env, monkeypatch, fake_kaggle):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_expired_token")

    result = run_fetch(tmp_path)

    assert result.returncode == 1
    assert f"Kaggle dataset {SLUG}: no valid Kaggle credentials found" in result.stderr
    assert "rejected the access token" in result.stderr
    assert fake_kaggle.download_requests == []


@pytest.mark.parametrize(
    ("key", "plan", "status"),
    [("wrong-key", ["ok"], "401"), (KEY, ["403"], "403")],
    ids=["401-wrong-key", "403-rules-not-accepted"],
)
def test_kaggle_rejected_credentials(tmp_path, kaggle_env, fake_kaggle, key, plan, status):
    write_kaggle_json(kaggle_env, key=key)
    fake_kaggle.plan = plan

    result = run_fetch(tmp_path)

    assert result.returncode == 1
    assert f"Kaggle dataset {SLUG}: credentials rejected (HTTP {status})" in result.stderr
    assert "accept the dataset's rules" in result.stderr
    assert len(fake_kaggle.download_requests) == 1


def test_kaggle_unknown_dataset(tmp_path, kaggle_env, fake_kaggle):
    write_kaggle_json(kaggle_env)

    result = run_fetch(tmp_path, slug="owner/no-such-dataset")

    assert result.returncode == 1
    assert "Kaggle dataset owner/no-such-dataset: not found (HTTP 404)" in result.stderr
    assert len(fake_kaggle.download_requests) == 1


@pytest.mark.parametrize("behavior", ["drop", "stall", "500", "truncate"])
def test_kaggle_transient_failure_exhausts_retries(tmp_path, kaggle_env, fake_kaggle, behavior):
    write_kaggle_json(kaggle_env)
    fake_kaggle.plan = [behavior]
    out = tmp_path / "raw" / "clothes"
    out.mkdir(parents=True)
    (out / "older.zip").write_bytes(b"from an older fetch")

    started = time.monotonic()
    result = run_fetch(tmp_path, retries=2)
    elapsed = time.monotonic() - started

    assert result.returncode == 1
    assert f"Kaggle dataset {SLUG}: download failed after 3 attempts" in result.stderr
    assert len(fake_kaggle.download_requests) == 3
    assert "attempt 1 of 3 failed" in result.stderr
    assert "retrying in 0.1 s" in result.stderr
    assert "attempt 2 of 3 failed" in result.stderr
    assert elapsed < 15
    assert sorted(p.name for p in out.iterdir()) == ["older.zip"]
    assert leftover_temp_folders(out.parent) == []


@pytest.mark.parametrize("behavior", ["drop", "stall", "500", "truncate"])
def test_kaggle_retry_then_success(tmp_path, kaggle_env, fake_kaggle, behavior):
    write_kaggle_json(kaggle_env)
    fake_kaggle.plan = [behavior, "ok"]

    result = run_fetch(tmp_path, retries=2)

    assert result.returncode == 0, result.stderr
    assert "attempt 1 of 3 failed" in result.stderr
    assert len(fake_kaggle.download_requests) == 2
    out = tmp_path / "raw" / "clothes"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-clothes.zip"]
    assert (out / "tiny-clothes.zip").read_bytes() == DATASET_ZIP


def test_kaggle_corrupt_download(tmp_path, kaggle_env, fake_kaggle):
    write_kaggle_json(kaggle_env)
    fake_kaggle.plan = ["corrupt"]

    result = run_fetch(tmp_path)

    assert result.returncode == 1
    assert f"Kaggle dataset {SLUG}: the download is corrupt" in result.stderr
    assert "Retry later" in result.stderr
    assert not (tmp_path / "raw" / "clothes").exists()
    assert leftover_temp_folders(tmp_path / "raw") == []
