"""Fetch one dataset source into ``data/raw/<source>``.

Reads ``params.yaml``:
  - ``sources.<source>.path``: a local zip, tar archive (.tar, .tar.gz, .tgz, .tar.bz2,
    .tar.xz) or folder, relative to the current directory or absolute. When set, the
    archive is copied byte for byte into ``<out>/<file name>``, or the folder into
    ``<out>/<folder name>/`` (symlinks and other special files are skipped with a warning).
    The source itself is never changed.
  - ``sources.<source>.kaggle``: the dataset slug (owner/name), downloaded with the official
    Kaggle client into ``<out>/<name>.zip`` when ``path`` is null.
  - ``fetch.retries``, ``fetch.backoff_seconds``, ``fetch.timeout_seconds``: retries after a
    failed download, the wait before the first retry (doubled for each further one), and
    the timeout of each HTTP request, in seconds.

Writes ``<out>`` atomically: the result is built in a temporary sibling folder and renamed
into place, replacing an older ``<out>``.

Run alone from the project root:
    python stages/fetch.py --source clothes [--params params.yaml] [--out data/raw/clothes]
"""

import argparse
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from modisch.kaggle_download import download_dataset
from modisch.params import load_params, source_params

log = logging.getLogger("fetch")

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def check_local_source(source: Path, out: Path, source_name: str) -> None:
    """Exit unless ``source`` is an existing archive or folder that ``out`` cannot overwrite."""
    if not source.exists():
        raise SystemExit(
            f"sources.{source_name}.path: {source} not found. Point it at an existing zip, "
            "tar archive or folder, or set it to null to download from Kaggle."
        )
    if source.is_file() and not is_archive(source):
        raise SystemExit(
            f"sources.{source_name}.path: {source} is not a supported archive "
            f"(expected one of {', '.join(ARCHIVE_SUFFIXES)}) or a folder."
        )

    # Replacing <out> would delete a source inside it, and copying a folder that contains
    # <out> would copy the staging folder into itself.
    source_resolved = source.resolve()
    out_resolved = out.resolve()
    if source_resolved.is_relative_to(out_resolved) or out_resolved.is_relative_to(source_resolved):
        raise SystemExit(
            f"sources.{source_name}.path: {source} overlaps the output folder {out}. "
            "Keep the local copy outside it."
        )


def skip_special_entries(folder: str, names: list[str]) -> set[str]:
    """Return the names in ``folder`` that are neither regular files nor folders.

    ``shutil.copytree`` calls this as its ``ignore`` hook, so symlinks are never followed.
    NOTE: the entries skipped here appear only in this stage's log, not in the ingest
    manifest, because ingest reads the copy, which lacks them.
    """
    skipped = set()
    for name in names:
        mode = os.lstat(os.path.join(folder, name)).st_mode
        if stat.S_ISLNK(mode):
            log.warning("Skipping symlink %s (symlinks are not followed)", os.path.join(folder, name))
            skipped.add(name)
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            log.warning("Skipping %s: not a regular file or folder", os.path.join(folder, name))
            skipped.add(name)
    return skipped


def copy_local_source(source: Path, staging: Path) -> Path:
    """Copy an archive or folder into ``staging`` under its own name and return the copy."""
    target = staging / source.name
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, ignore=skip_special_entries)
    else:
        shutil.copy2(source, target)
    return target


def replace_folder(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``, replacing any older ``out``.

    Each rename is atomic, so ``out`` is either the old or the new complete folder, or
    briefly missing between the two renames.
    """
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / out.name)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def count_files(folder: Path) -> tuple[int, int]:
    """Return the number of files under ``folder`` and their total size in bytes."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def fetch_source(
    source_name: str,
    kaggle_slug: str | None,
    local_path: str | None,
    out: Path,
    *,
    retries: int,
    backoff_seconds: float,
    timeout_seconds: float,
) -> None:
    """Write the source's archive or folder into ``out``, from ``local_path`` or Kaggle."""
    if local_path is not None:
        source = Path(local_path)
        check_local_source(source, out, source_name)
    elif not kaggle_slug:
        raise SystemExit(
            f"params.yaml: sources.{source_name} needs a 'kaggle' slug (owner/name) or a 'path'."
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if local_path is not None:
            copy_local_source(source, staging)
        else:
            download_dataset(
                kaggle_slug,
                source_name,
                staging,
                retries=retries,
                backoff_seconds=backoff_seconds,
                timeout_seconds=timeout_seconds,
            )
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_fetch_params(params: dict) -> tuple[int, float, float]:
    """Return ``fetch.retries``, ``fetch.backoff_seconds`` and ``fetch.timeout_seconds``."""
    fetch = params.get("fetch") or {}
    try:
        retries = int(fetch["retries"])
        backoff_seconds = float(fetch["backoff_seconds"])
        timeout_seconds = float(fetch["timeout_seconds"])
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(
            f"params.yaml: fetch needs numeric retries, backoff_seconds and timeout_seconds "
            f"({type(error).__name__}: {error})."
        ) from None
    if retries < 0 or backoff_seconds < 0 or timeout_seconds <= 0:
        raise SystemExit(
            "params.yaml: fetch.retries and fetch.backoff_seconds must be >= 0 and "
            f"fetch.timeout_seconds > 0 (got {retries}, {backoff_seconds}, {timeout_seconds})."
        )
    return retries, backoff_seconds, timeout_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="name of an entry under 'sources' in params.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", help="output folder (default: data/raw/<source>)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    params = load_params(args.params)
    source = source_params(params, args.source)
    retries, backoff_seconds, timeout_seconds = read_fetch_params(params)
    out = Path(args.out or Path("data/raw") / args.source)
    local_path = source.get("path")
    kaggle_slug = source.get("kaggle")

    origin = f"local path {local_path}" if local_path is not None else f"Kaggle dataset {kaggle_slug}"
    log.info("Fetching source %s from %s into %s", args.source, origin, out)

    fetch_source(
        args.source,
        kaggle_slug,
        local_path,
        out,
        retries=retries,
        backoff_seconds=backoff_seconds,
        timeout_seconds=timeout_seconds,
    )

    file_count, total_bytes = count_files(out)
    log.info("Fetched source %s: %d files, %d bytes in %s", args.source, file_count, total_bytes, out)


if __name__ == "__main__":
    main()
