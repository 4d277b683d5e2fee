"""Tests for modisch.archives, on zip files, tar archives and folders built in each test."""

import io
import os
import stat
import tarfile
import warnings
import zipfile

import pytest

from modisch.archives import ArchiveLimits, MemberReadError, iter_members

LIMITS = ArchiveLimits(max_total_bytes=100_000, max_entry_bytes=1_000, max_ratio=50)

NFC_NAME = "caf\u00e9.jpg"
NFD_NAME = "cafe\u0301.jpg"


def incompressible(size: int, seed: int = 1) -> bytes:
    return bytes((index * 7919 + seed * 104729) % 251 for index in range(size))


def add_zip_entry(archive, name, data=b"x", *, mode=None, compress=zipfile.ZIP_STORED):
    info = zipfile.ZipInfo(name)
    info.compress_type = compress
    if mode is not None:
        info.external_attr = mode << 16
    archive.writestr(info, data)


def build_zip(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns on duplicate names
        with zipfile.ZipFile(path, "w") as archive:
            add_zip_entry(archive, "Shoes/boots/b.jpg", b"boot b")
            add_zip_entry(archive, "Shoes/boots/a.jpg", b"boot a")
            add_zip_entry(archive, "Shoes/", b"")
            add_zip_entry(archive, "Shoes/a.txt", b"notes")
            add_zip_entry(archive, "../evil.jpg")
            add_zip_entry(archive, "/abs.jpg")
            add_zip_entry(archive, "C:/drive.jpg")
            add_zip_entry(archive, "a\\..\\b.jpg")
            add_zip_entry(archive, "link.jpg", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
            add_zip_entry(archive, "secret.jpg", b"cipher")
            add_zip_entry(archive, "large.jpg", incompressible(2_000))
            add_zip_entry(archive, "bomb.jpg", b"\0" * 1_000, compress=zipfile.ZIP_DEFLATED)
            add_zip_entry(archive, "dup.jpg", b"first")
            add_zip_entry(archive, "dup.jpg", b"second")
            add_zip_entry(archive, "./x\\dup2.jpg", b"first")
            add_zip_entry(archive, "x/dup2.jpg", b"second")
            add_zip_entry(archive, NFC_NAME, b"nfc")
            add_zip_entry(archive, NFD_NAME, b"nfd")
    set_encrypted_flag(path, "secret.jpg")


def set_encrypted_flag(path, entry_name):
    """Set flag bit 0 (encrypted) of one entry in its local and central headers.

    zipfile clears that bit when it writes, so the bytes are patched afterwards.
    """
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local_offset = archive.getinfo(entry_name).header_offset
    data[local_offset + 6] |= 0x1

    encoded = entry_name.encode("ascii")
    central = data.index(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(encoded)] != encoded:
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 8] |= 0x1
    path.write_bytes(bytes(data))


def build_tar(path, mode):
    entries = [
        ("Shoes/boots/b.jpg", tarfile.REGTYPE, b"boot b"),
        ("Shoes/boots/a.jpg", tarfile.REGTYPE, b"boot a"),
        ("Shoes", tarfile.DIRTYPE, b""),
        ("Shoes/a.txt", tarfile.REGTYPE, b"notes"),
        ("../evil.jpg", tarfile.REGTYPE, b"x"),
        ("/abs.jpg", tarfile.REGTYPE, b"x"),
        ("link.jpg", tarfile.SYMTYPE, b""),
        ("hard.jpg", tarfile.LNKTYPE, b""),
        ("device", tarfile.CHRTYPE, b""),
        ("fifo", tarfile.FIFOTYPE, b""),
        ("large.jpg", tarfile.REGTYPE, incompressible(2_000)),
        ("dup.jpg", tarfile.REGTYPE, b"first"),
        ("dup.jpg", tarfile.REGTYPE, b"second"),
        (NFC_NAME, tarfile.REGTYPE, b"nfc"),
        (NFD_NAME, tarfile.REGTYPE, b"nfd"),
        ("bad\udce9.jpg", tarfile.REGTYPE, b"latin-1 name"),
    ]
    with tarfile.open(
        path, mode, format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for name, entry_type, data in entries:
            info = tarfile.TarInfo(name)
            info.type = entry_type
            info.size = len(data)
            if entry_type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "Shoes/boots/a.jpg"
            archive.addfile(info, io.BytesIO(data) if data else None)


def members_by_path(raw_dir, limits=LIMITS):
    """Return {path: (problem, data or None)}, reading each member during iteration."""
    found = {}
    for member in iter_members(raw_dir, limits):
        data = member.read() if member.problem is None else None
        assert member.path not in found or member.problem is not None, member.path
        found.setdefault(member.path, (member.problem, data))
    return found


ZIP_CASES = [
    # entry path inside the archive, expected problem, expected data when readable
    ("Shoes/boots/a.jpg", None, b"boot a"),
    ("Shoes/boots/b.jpg", None, b"boot b"),
    ("Shoes/a.txt", None, b"notes"),
    ("../evil.jpg", "path_escape", None),
    ("abs.jpg", "path_escape", None),
    ("C:/drive.jpg", "path_escape", None),
    ("a/../b.jpg", "path_escape", None),
    ("link.jpg", "not_regular_file", None),
    ("secret.jpg", "encrypted", None),
    ("large.jpg", "entry_too_large", None),
    ("bomb.jpg", "compression_ratio", None),
    ("dup.jpg", None, b"first"),
    ("x/dup2.jpg", None, b"first"),
    (NFC_NAME, None, b"nfc"),
    (NFD_NAME, None, b"nfd"),
]


@pytest.mark.parametrize(("entry", "problem", "data"), ZIP_CASES, ids=[case[0] for case in ZIP_CASES])
def test_iter_members_zip_entry(tmp_path, entry, problem, data):
    build_zip(tmp_path / "source.zip")

    found = members_by_path(tmp_path)

    assert found[f"source.zip/{entry}"] == (problem, data)


def test_iter_members_zip_duplicates_flagged(tmp_path):
    build_zip(tmp_path / "source.zip")

    problems = [member.problem for member in iter_members(tmp_path, LIMITS) if member.path.endswith("/dup.jpg")]

    assert problems == [None, "duplicate_entry"]


def test_iter_members_zip_sorted_without_directories(tmp_path):
    build_zip(tmp_path / "source.zip")

    paths = [member.path for member in iter_members(tmp_path, LIMITS)]

    assert paths == sorted(paths)
    assert "source.zip/Shoes" not in paths
    assert "source.zip/Shoes/" not in paths


TAR_CASES = [
    ("Shoes/boots/a.jpg", None, b"boot a"),
    ("Shoes/boots/b.jpg", None, b"boot b"),
    ("Shoes/a.txt", None, b"notes"),
    ("../evil.jpg", "path_escape", None),
    ("abs.jpg", "path_escape", None),
    ("link.jpg", "not_regular_file", None),
    ("hard.jpg", "not_regular_file", None),
    ("device", "not_regular_file", None),
    ("fifo", "not_regular_file", None),
    ("large.jpg", "entry_too_large", None),
    ("dup.jpg", None, b"first"),
    (NFC_NAME, None, b"nfc"),
    (NFD_NAME, None, b"nfd"),
    ("bad\\xe9.jpg", "invalid_name", None),
]


@pytest.mark.parametrize(
    ("file_name", "mode"),
    [("source.tar", "w"), ("source.tar.gz", "w:gz"), ("source.tar.bz2", "w:bz2"), ("source.tar.xz", "w:xz")],
)
@pytest.mark.parametrize(("entry", "problem", "data"), TAR_CASES, ids=[case[0] for case in TAR_CASES])
def test_iter_members_tar_entry(tmp_path, file_name, mode, entry, problem, data):
    build_tar(tmp_path / file_name, mode)

    found = members_by_path(tmp_path)

    assert found[f"{file_name}/{entry}"] == (problem, data)


def test_iter_members_tar_sorted_and_duplicates(tmp_path):
    build_tar(tmp_path / "source.tgz", "w:gz")

    members = list(iter_members(tmp_path, LIMITS))
    paths = [member.path for member in members]

    assert paths == sorted(paths)
    assert "source.tgz/Shoes" not in paths
    assert [m.problem for m in members if m.path == "source.tgz/dup.jpg"] == [None, "duplicate_entry"]


def test_iter_members_detects_by_content(tmp_path):
    build_tar(tmp_path / "download.bin", "w:gz")
    build_zip(tmp_path / "other.dat")

    found = members_by_path(tmp_path)

    assert found["download.bin/Shoes/boots/a.jpg"] == (None, b"boot a")
    assert found["other.dat/Shoes/boots/a.jpg"] == (None, b"boot a")


def test_iter_members_compressed_tar_ratio(tmp_path):
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("zeros.jpg")
        info.size = 900
        archive.addfile(info, io.BytesIO(b"\0" * 900))

    limits = ArchiveLimits(max_total_bytes=100_000, max_entry_bytes=1_000, max_ratio=5)
    found = members_by_path(tmp_path, limits)

    assert found["bomb.tar.gz/zeros.jpg"] == ("compression_ratio", None)


def test_iter_members_archive_total_limit(tmp_path):
    with zipfile.ZipFile(tmp_path / "total.zip", "w") as archive:
        for index, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]):
            add_zip_entry(archive, name, incompressible(900, seed=index))

    limits = ArchiveLimits(max_total_bytes=3_000, max_entry_bytes=1_000, max_ratio=50)
    problems = {member.path: member.problem for member in iter_members(tmp_path, limits)}

    assert problems == {
        "total.zip/a.jpg": None,
        "total.zip/b.jpg": None,
        "total.zip/c.jpg": None,
        "total.zip/d.jpg": "archive_too_large",
        "total.zip/e.jpg": "archive_too_large",
    }


def test_iter_members_zip_lying_size_stops(tmp_path):
    path = tmp_path / "lying.zip"
    with zipfile.ZipFile(path, "w") as archive:
        add_zip_entry(archive, "big.jpg", b"a" * 5_000, compress=zipfile.ZIP_DEFLATED)

    # Patch the central directory's uncompressed size to 10 bytes.
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(data))

    limits = ArchiveLimits(max_total_bytes=100_000, max_entry_bytes=1_000, max_ratio=1_000)
    (member,) = list(iter_members(tmp_path, limits))
    assert member.problem is None
    assert member.size == 10

    # The archive is closed after iteration, so open it again to read.
    for member in iter_members(tmp_path, limits):
        with pytest.raises(MemberReadError) as caught:
            member.read()
        assert caught.value.reason in ("entry_too_large", "corrupt_entry")


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("broken.zip", b"PK\x03\x04" + b"\x00" * 40),
        ("broken.tar.gz", b"\x1f\x8b\x08\x00" + b"\x13" * 40),
        ("named.zip", b"plain text, not a zip"),
        ("named.tar", b"\x00\x01" * 300),
    ],
)
def test_iter_members_corrupt_archive(tmp_path, file_name, content):
    (tmp_path / file_name).write_bytes(content)

    members = list(iter_members(tmp_path, LIMITS))

    assert [(m.path, m.problem) for m in members] == [(file_name, "corrupt_archive")]
    with pytest.raises(ValueError):
        members[0].read()


def test_iter_members_truncated_tgz_keeps_listed(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for index in range(20):
            info = tarfile.TarInfo(f"img{index:02d}.jpg")
            data = incompressible(800, seed=index)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    (tmp_path / "cut.tgz").write_bytes(data[: len(data) // 2])

    members = list(iter_members(tmp_path, LIMITS))

    assert members[-1].path == "cut.tgz"
    assert members[-1].problem == "corrupt_archive"
    assert members[0].path == "cut.tgz/img00.jpg"


def test_iter_members_folder_source(tmp_path):
    folder = tmp_path / "myfolder"
    (folder / "boots").mkdir(parents=True)
    (folder / "boots" / "a.jpg").write_bytes(b"boot a")
    (folder / "boots.txt").write_bytes(b"notes")
    (folder / "boots" / "link.jpg").symlink_to(folder / "boots" / "a.jpg")
    (folder / "linked_dir").symlink_to(folder / "boots")
    os.mkfifo(folder / "pipe")
    (tmp_path / "loose.jpg").write_bytes(b"loose")

    members = list(iter_members(tmp_path, LIMITS))

    assert [(m.path, m.problem) for m in members] == [
        ("loose.jpg", None),
        ("myfolder/boots.txt", None),
        ("myfolder/boots/a.jpg", None),
        ("myfolder/boots/link.jpg", "not_regular_file"),
        ("myfolder/linked_dir", "not_regular_file"),
        ("myfolder/pipe", "not_regular_file"),
    ]
    assert members[0].read() == b"loose"
    assert members[2].read() == b"boot a"


def test_iter_members_folder_entry_too_large(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "huge.jpg").write_bytes(b"\0" * 2_000)

    (member,) = list(iter_members(tmp_path, LIMITS))

    assert (member.path, member.size, member.problem) == ("big/huge.jpg", 2_000, "entry_too_large")


def test_member_read_after_close_raises(tmp_path):
    build_zip(tmp_path / "source.zip")

    members = list(iter_members(tmp_path, LIMITS))
    readable = [member for member in members if member.problem is None]

    with pytest.raises(MemberReadError) as caught:
        readable[0].read()
    assert caught.value.reason == "archive_closed"


def test_member_read_with_problem_raises(tmp_path):
    build_zip(tmp_path / "source.zip")

    escaped = next(m for m in iter_members(tmp_path, LIMITS) if m.problem == "path_escape")

    with pytest.raises(ValueError):
        escaped.read()


def test_iter_members_output_deterministic(tmp_path):
    build_zip(tmp_path / "b.zip")
    build_tar(tmp_path / "a.tar.gz", "w:gz")

    first = [(m.path, m.size, m.problem) for m in iter_members(tmp_path, LIMITS)]
    second = [(m.path, m.size, m.problem) for m in iter_members(tmp_path, LIMITS)]

    assert first == second
    assert first[0][0].startswith("a.tar.gz/")


def test_iter_members_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_members(tmp_path / "missing", LIMITS))
