"""Write stage outputs so that an interrupted stage never leaves a finished-looking one.

Each helper builds the output beside its final path and renames it into place only after
the stage's work has succeeded. A crash leaves at most a ``*.partial`` sibling, which no
stage reads and the next run removes.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty folder that replaces ``final`` when the block exits without error."""
    final = Path(final)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_json(path: Path, data: dict) -> None:
    """Write a metrics or report file as sorted, indented JSON."""
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write a manifest or plot table as UTF-8 CSV with LF line endings."""
    text = frame.to_csv(index=False, lineterminator="\n")
    write_bytes_atomic(path, text.encode("utf-8"))


def read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV that an earlier stage wrote, keeping every column as written."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run the stage that writes it first (dvc repro).")
    return pd.read_csv(path, dtype=str, keep_default_na=False)
