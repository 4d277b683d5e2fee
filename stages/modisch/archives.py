"""List and read the members of a fetched source without extracting anything to disk.

A source folder such as ``data/raw/clothes`` contains what the fetch stage wrote: zip
files, tar archives, folders or loose files. :func:`iter_members` yields every file
inside them as a :class:`Member` in a fixed order. Archive and folder contents are
untrusted, so a member that must not be read carries a ``problem`` code instead of
raising, and the caller reports it.

Problem codes:

- ``path_escape``: absolute name, drive letter or ``..`` component.
- ``not_regular_file``: symlink, hard link, device or fifo.
- ``encrypted``: zip entry with the encryption flag set.
- ``entry_too_large``: declared size above ``max_entry_bytes``.
- ``compression_ratio``: uncompressed / compressed size above ``max_ratio``.
- ``archive_too_large``: running total of declared sizes above ``max_total_bytes``.
- ``duplicate_entry``: a later entry with the same normalised name in one archive.
- ``invalid_name``: a name that is not valid UTF-8.
- ``corrupt_archive``: the archive cannot be opened or listed to the end.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PATH_ESCAPE = "path_escape"
NOT_REGULAR_FILE = "not_regular_file"
ENCRYPTED = "encrypted"
ENTRY_TOO_LARGE = "entry_too_large"
COMPRESSION_RATIO = "compression_ratio"
ARCHIVE_TOO_LARGE = "archive_too_large"
DUPLICATE_ENTRY = "duplicate_entry"
INVALID_NAME = "invalid_name"
CORRUPT_ARCHIVE = "corrupt_archive"
# Reasons raised by Member.read and never set as a problem: the entry's data is
# damaged, or the iterator has moved past the archive and closed it.
CORRUPT_ENTRY = "corrupt_entry"
ARCHIVE_CLOSED = "archive_closed"

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz")

# Exceptions that zipfile and tarfile raise for damaged or hostile archive data.
ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
)

_READ_CHUNK_BYTES = 1 << 20
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    """Size limits applied to every archive of a source."""

    max_total_bytes: int  # uncompressed size of all entries of one archive together
    max_entry_bytes: int  # uncompressed size of one entry
    max_ratio: float  # uncompressed / compressed size of one entry


class MemberReadError(ValueError):
    """Failure to read a member, with ``reason`` a problem code, ``corrupt_entry`` or ``archive_closed``."""

    def __init__(self, reason: str, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason
        self.path = path


@dataclass(frozen=True)
class Member:
    """One file inside a source, addressed as ``<top item name>/<entry path>``."""

    path: str  # POSIX path; names that are not valid UTF-8 are backslash-escaped
    size: int  # uncompressed size in bytes, as declared by the archive or the file system
    problem: str | None  # reason code when the member must not be read
    _reader: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)

    def read(self) -> bytes:
        """Read the member's bytes.

        Archive members can be read only while the iteration is still on their archive,
        because the archive is closed when the iterator moves on. Raises
        :class:`MemberReadError` (a ``ValueError``) when ``problem`` is set, when the data
        grows past the entry limit despite a smaller declared size, or when it is damaged.
        """
        if self.problem is not None:
            raise MemberReadError(self.problem, self.path, f"member not readable ({self.problem})")
        if self._reader is None:
            raise MemberReadError(CORRUPT_ENTRY, self.path, "member has no data")
        return self._reader()


def iter_members(raw_dir: Path, limits: ArchiveLimits) -> Iterator[Member]:
    """Yield every file of a fetched source in a deterministic order.

    Top items of ``raw_dir`` come in sorted order. Zip and tar archives are recognised by
    their content, and their entries come sorted by normalised name. Folders are walked
    without following symlinks and their files come sorted by relative path. Any other
    file is a member itself. A symlink directly in ``raw_dir`` is followed, because the
    fetch stage made it; symlinks inside archives and folders are not.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: source folder not found. Run the fetch stage first.")

    for item in sorted(raw_dir.iterdir(), key=lambda p: p.name):
        top_name = _printable_name(item.name)
        if item.is_dir():
            yield from _iter_folder(item, top_name, limits)
        elif item.is_file():
            yield from _iter_file(item, top_name, limits)
        else:
            # A dangling symlink, fifo, socket or device.
            yield Member(top_name, 0, NOT_REGULAR_FILE)


def _iter_file(path: Path, top_name: str, limits: ArchiveLimits) -> Iterator[Member]:
    kind = _archive_kind(path)
    if kind == "zip":
        yield from _iter_zip(path, top_name, limits)
    elif kind == "tar":
        yield from _iter_tar(path, top_name, limits)
    elif kind == "corrupt":
        yield Member(top_name, _file_size(path), CORRUPT_ARCHIVE)
    else:
        size = _file_size(path)
        problem = ENTRY_TOO_LARGE if size > limits.max_entry_bytes else None
        if top_name != path.name:
            problem = INVALID_NAME
        yield Member(top_name, size, problem, _file_reader(path, top_name, limits))


def _archive_kind(path: Path) -> str | None:
    """Return "zip", "tar", "corrupt" (named like an archive but unreadable) or None."""
    with path.open("rb") as f:
        head = f.read(512)

    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if _is_tar(path):
        return "tar"

    name = path.name.lower()
    # A zip may start with other data (a self-extractor stub) before the first entry.
    if name.endswith(ZIP_SUFFIXES):
        return "zip" if _is_zip(path) else "corrupt"
    if name.endswith(TAR_SUFFIXES):
        return "corrupt"
    return None


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except ARCHIVE_ERRORS:
        return False


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except ARCHIVE_ERRORS:
        return False


class _EntryChecker:
    """Problem checks shared by zip and tar entries, with the per-archive state."""

    def __init__(self, limits: ArchiveLimits):
        self.limits = limits
        self.seen_names: set[str] = set()
        self.total_bytes = 0

    def check(self, name: str, size: int, ratio: float) -> str | None:
        """Return the problem of a regular entry with a valid, normalised name."""
        if name in self.seen_names:
            return DUPLICATE_ENTRY
        self.seen_names.add(name)

        if size > self.limits.max_entry_bytes:
            return ENTRY_TOO_LARGE
        if ratio > self.limits.max_ratio:
            return COMPRESSION_RATIO

        # Only entries that would be read count towards the total.
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            return ARCHIVE_TOO_LARGE
        return None


def _normalise_entry_name(raw_name: str) -> tuple[str, str | None]:
    """Return the entry's POSIX name and its problem (path_escape or invalid_name).

    Backslashes count as separators, and empty and "." components are dropped. Unicode
    normalisation is not applied, so NFC and NFD spellings stay different names.
    """
    name = raw_name.replace("\\", "/")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    normalised = "/".join(parts)

    printable = _printable_name(normalised)
    if printable != normalised:
        return printable, INVALID_NAME
    if name.startswith("/") or _DRIVE_LETTER.match(name) or ".." in parts:
        return normalised, PATH_ESCAPE
    return normalised, None


def _printable_name(name: str) -> str:
    """Return the name with undecodable bytes (surrogate escapes) as backslash escapes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")
    return name


def _iter_zip(path: Path, top_name: str, limits: ArchiveLimits) -> Iterator[Member]:
    try:
        archive = zipfile.ZipFile(path)
    except ARCHIVE_ERRORS:
        # NOTE: a name flagged as UTF-8 whose bytes are not UTF-8 makes zipfile fail here,
        # so the whole archive is reported as corrupt rather than one invalid_name entry.
        yield Member(top_name, _file_size(path), CORRUPT_ARCHIVE)
        return

    with archive:
        entries = []
        for index, info in enumerate(archive.infolist()):
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if info.is_dir() or file_type == stat.S_IFDIR:
                continue
            name, problem = _normalise_entry_name(info.filename)
            if not name:
                continue
            entries.append((name, index, info, file_type, problem))
        entries.sort(key=lambda entry: (entry[0], entry[1]))

        checker = _EntryChecker(limits)
        for name, _, info, file_type, problem in entries:
            member_path = f"{top_name}/{name}"
            if problem is None and file_type not in (0, stat.S_IFREG):
                problem = NOT_REGULAR_FILE
            if problem is None and info.flag_bits & 0x1:
                problem = ENCRYPTED
            if problem is None:
                ratio = _zip_ratio(info)
                problem = checker.check(name, info.file_size, ratio)

            reader = None
            if problem is None:
                reader = _zip_reader(archive, info, member_path, limits.max_entry_bytes)
            yield Member(member_path, info.file_size, problem, reader)


def _zip_ratio(info: zipfile.ZipInfo) -> float:
    if info.file_size == 0:
        return 0.0
    if info.compress_size == 0:
        return float("inf")
    return info.file_size / info.compress_size


def _zip_reader(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, member_path: str, max_bytes: int
) -> Callable[[], bytes]:
    def read() -> bytes:
        if archive.fp is None:
            raise _closed_error(member_path)
        try:
            with archive.open(info) as stream:
                return _read_limited(stream, member_path, max_bytes)
        except MemberReadError:
            raise
        except ARCHIVE_ERRORS as error:
            raise _read_error(member_path, error) from error

    return read


def _iter_tar(path: Path, top_name: str, limits: ArchiveLimits) -> Iterator[Member]:
    try:
        archive = tarfile.open(path, "r:*", encoding="utf-8", errors="surrogateescape")
    except ARCHIVE_ERRORS:
        yield Member(top_name, _file_size(path), CORRUPT_ARCHIVE)
        return

    with archive:
        infos, listing_failed = _list_tar(archive)

        entries = []
        for index, info in enumerate(infos):
            if info.isdir():
                continue
            name, problem = _normalise_entry_name(info.name)
            if not name:
                continue
            entries.append((name, index, info, problem))
        entries.sort(key=lambda entry: (entry[0], entry[1]))

        # The ratio of a compressed tar is known only for the whole archive, so every
        # entry of an archive above the limit gets the problem.
        archive_ratio = 0.0
        compressed_size = _file_size(path)
        if _is_compressed(path) and compressed_size > 0:
            declared = sum(info.size for _, _, info, _ in entries if info.isreg())
            archive_ratio = declared / compressed_size

        checker = _EntryChecker(limits)
        for name, _, info, problem in entries:
            member_path = f"{top_name}/{name}"
            if problem is None and not info.isreg():
                problem = NOT_REGULAR_FILE
            if problem is None:
                problem = checker.check(name, info.size, archive_ratio)

            reader = None
            if problem is None:
                reader = _tar_reader(archive, info, member_path, limits.max_entry_bytes)
            yield Member(member_path, info.size, problem, reader)

        if listing_failed:
            yield Member(top_name, compressed_size, CORRUPT_ARCHIVE)


def _list_tar(archive: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], bool]:
    """Return the members listed before any error, and whether listing failed.

    NOTE: tarfile ends the listing without an error at some damaged headers after the
    first, so a truncated uncompressed tar can look complete. Reading its last entry
    then fails instead.
    """
    infos = []
    try:
        while (info := archive.next()) is not None:
            infos.append(info)
    except ARCHIVE_ERRORS:
        return infos, True
    return infos, False


def _is_compressed(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def _tar_reader(
    archive: tarfile.TarFile, info: tarfile.TarInfo, member_path: str, max_bytes: int
) -> Callable[[], bytes]:
    # NOTE: entries are read in name order, not archive order, so a compressed tar whose
    # entries are stored out of name order is decompressed again from its start for each
    # backward seek. That is slow for large .tar.gz sources but reads the same bytes.
    def read() -> bytes:
        if archive.closed:
            raise _closed_error(member_path)
        try:
            stream = archive.extractfile(info)
            if stream is None:
                raise MemberReadError(NOT_REGULAR_FILE, member_path, "entry has no file data")
            with stream:
                return _read_limited(stream, member_path, max_bytes)
        except MemberReadError:
            raise
        except ARCHIVE_ERRORS as error:
            raise _read_error(member_path, error) from error

    return read


def _iter_folder(folder: Path, top_name: str, limits: ArchiveLimits) -> Iterator[Member]:
    """Yield the files under a folder sorted by relative path, without following symlinks."""
    found: list[tuple[str, os.DirEntry]] = []
    _walk_folder(folder, "", found)
    found.sort(key=lambda item: item[0])

    total_bytes = 0
    for relative, entry in found:
        printable = _printable_name(relative)
        member_path = f"{top_name}/{printable}"
        if printable != relative or top_name != folder.name:
            yield Member(member_path, 0, INVALID_NAME)
            continue
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            yield Member(member_path, 0, NOT_REGULAR_FILE)
            continue

        size = entry.stat(follow_symlinks=False).st_size
        problem = None
        if size > limits.max_entry_bytes:
            problem = ENTRY_TOO_LARGE
        else:
            total_bytes += size
            if total_bytes > limits.max_total_bytes:
                problem = ARCHIVE_TOO_LARGE

        reader = None
        if problem is None:
            reader = _file_reader(Path(entry.path), member_path, limits)
        yield Member(member_path, size, problem, reader)


def _walk_folder(folder: Path, prefix: str, found: list[tuple[str, os.DirEntry]]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                _walk_folder(Path(entry.path), f"{relative}/", found)
            else:
                found.append((relative, entry))


def _file_reader(path: Path, member_path: str, limits: ArchiveLimits) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            # O_NOFOLLOW keeps a file swapped for a symlink after listing from being followed.
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(descriptor, "rb") as stream:
                return _read_limited(stream, member_path, limits.max_entry_bytes)
        except OSError as error:
            raise _read_error(member_path, error) from error

    return read


def _read_limited(stream, member_path: str, max_bytes: int) -> bytes:
    """Read a stream to its end, raising once it passes ``max_bytes``."""
    chunks = []
    total = 0
    while chunk := stream.read(min(_READ_CHUNK_BYTES, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise MemberReadError(
                ENTRY_TOO_LARGE,
                member_path,
                f"data passes the entry limit of {max_bytes} bytes, whatever size the header declares",
            )
    return b"".join(chunks)


def _read_error(member_path: str, error: BaseException) -> MemberReadError:
    return MemberReadError(CORRUPT_ENTRY, member_path, f"entry data is damaged ({error})")


def _closed_error(member_path: str) -> MemberReadError:
    return MemberReadError(
        ARCHIVE_CLOSED, member_path, "archive already closed, so read each member before advancing the iterator"
    )


def _file_size(path: Path) -> int:
    return path.stat().st_size
