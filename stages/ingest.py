"""Ingest one fetched source: decode every file, store normalised images, list them all.

Reads   data/raw/<source>/            archives or folders exactly as fetched
Writes  data/ingested/<source>/images/<key>.jpg   one RGB JPEG per accepted image
        data/ingested/<source>/manifest.csv       one row per file of the source
Params  ingest.max_pixels, ingest.min_side, ingest.max_side, ingest.jpeg_quality,
        ingest.archive.*

Every file of the source gets a manifest row with its status: ``accepted``, ``rejected``
(unsafe archive entry or bad image, with the reason) or ``skipped`` (system files, files
that are not images, files outside any class folder). No class map is applied here, so
a class map change does not re-decode images.

Run alone:  python stages/ingest.py --source clothes
"""

import argparse
import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from modisch.progress import progress

from modisch.archives import ArchiveLimits, MemberReadError, iter_members
from modisch.images import (
    ImageRejected,
    encode_jpeg,
    is_system_file,
    load_image,
    perceptual_hash,
    pixel_sha256,
    shrink,
)
from modisch.layout import class_label, source_split
from modisch.outputs import staged_dir, write_csv
from modisch.params import load_params

log = logging.getLogger("ingest")

COLUMNS = [
    "source", "path", "label", "source_split", "status", "reason", "detail",
    "file_sha256", "pixel_sha256", "phash", "format", "mode", "width", "height", "image",
]
SKIP_REASONS = frozenset({"system_file", "not_an_image", "no_class_folder"})


@dataclass(frozen=True)
class ImageSettings:
    max_pixels: int
    min_side: int
    max_side: int
    jpeg_quality: int


def image_key(member_path: str) -> str:
    """Name a stored image after its source path, so equal file names never collide."""
    return hashlib.sha256(member_path.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def process_file(path: str, data: bytes, settings: ImageSettings) -> tuple[dict, bytes | None]:
    """Decode one file; return its manifest fields and the normalised JPEG, if accepted."""
    row = {"file_sha256": hashlib.sha256(data).hexdigest()}
    try:
        loaded = load_image(data, path, max_pixels=settings.max_pixels, min_side=settings.min_side)
    except ImageRejected as error:
        status = "skipped" if error.reason in SKIP_REASONS else "rejected"
        return {**row, "status": status, "reason": error.reason, "detail": error.detail}, None

    stored = shrink(loaded.image, settings.max_side)
    row.update(
        status="accepted",
        reason="extension_mismatch" if loaded.extension_mismatch else "",
        detail=f"content is {loaded.format}" if loaded.extension_mismatch else "",
        pixel_sha256=pixel_sha256(loaded.image),
        phash=perceptual_hash(stored),
        format=loaded.format,
        mode=loaded.mode,
        width=str(loaded.width),
        height=str(loaded.height),
    )
    return row, encode_jpeg(stored, settings.jpeg_quality)


def _process_job(job: tuple[str, bytes, ImageSettings]) -> tuple[dict, bytes | None]:
    return process_file(*job)


def iter_jobs(members, settings: ImageSettings, rows: list[dict]):
    """Yield decode jobs for readable members; record the others in ``rows`` directly."""
    for member in members:
        base = {"path": member.path, "label": class_label(member.path),
                "source_split": source_split(member.path)}
        if member.problem:
            rows.append({**base, "status": "rejected", "reason": member.problem})
        elif is_system_file(member.path):
            rows.append({**base, "status": "skipped", "reason": "system_file"})
        elif not base["label"]:
            rows.append({**base, "status": "skipped", "reason": "no_class_folder",
                         "detail": "the file is not inside a class folder"})
        else:
            try:
                data = member.read()
            except MemberReadError as error:
                rows.append({**base, "status": "rejected", "reason": error.reason,
                             "detail": str(error)})
                continue
            rows.append(base)
            yield len(rows) - 1, (member.path, data, settings)


def ingest_source(source: str, raw_dir: Path, out_dir: Path, limits: ArchiveLimits,
                  settings: ImageSettings, workers: int) -> pd.DataFrame:
    """Ingest every member of ``raw_dir`` into ``out_dir``; return the manifest."""
    if not raw_dir.is_dir():
        raise SystemExit(f"{raw_dir}: not found; run the fetch stage for {source!r} first.")

    rows: list[dict] = []
    with staged_dir(out_dir) as staging, ProcessPoolExecutor(max_workers=workers) as pool:
        images_dir = staging / "images"
        images_dir.mkdir()
        jobs = iter_jobs(iter_members(raw_dir, limits), settings, rows)
        indexed = ((index, job) for index, job in jobs)
        # Results come back in submission order, which keeps the output deterministic.
        pending = {}
        bar = progress(desc=f"ingest {source}", unit="file")
        for index, job in indexed:
            pending[index] = pool.submit(_process_job, job)
            if len(pending) >= 4 * workers:
                _collect(pending, rows, images_dir, bar, keep=2 * workers)
        _collect(pending, rows, images_dir, bar, keep=0)
        bar.close()

        manifest = pd.DataFrame(rows, columns=COLUMNS[1:]).fillna("")
        manifest.insert(0, "source", source)
        write_csv(staging / "manifest.csv", manifest)
    return manifest


def _collect(pending: dict, rows: list[dict], images_dir: Path, bar, keep: int) -> None:
    for index in sorted(pending)[: max(0, len(pending) - keep)]:
        fields, jpeg = pending.pop(index).result()
        rows[index].update(fields)
        if jpeg is not None:
            name = f"{image_key(rows[index]['path'])}.jpg"
            (images_dir / name).write_bytes(jpeg)
            rows[index]["image"] = f"images/{name}"
        bar.update(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="source name under 'sources' in params.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--raw", type=Path, help="fetched source folder (default: data/raw/<source>)")
    parser.add_argument("--out", type=Path, help="output folder (default: data/ingested/<source>)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes (default: one per CPU core)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = load_params(args.params)["ingest"]
    limits = ArchiveLimits(
        max_total_bytes=int(params["archive"]["max_total_bytes"]),
        max_entry_bytes=int(params["archive"]["max_entry_bytes"]),
        max_ratio=float(params["archive"]["max_ratio"]),
    )
    settings = ImageSettings(
        max_pixels=int(params["max_pixels"]),
        min_side=int(params["min_side"]),
        max_side=int(params["max_side"]),
        jpeg_quality=int(params["jpeg_quality"]),
    )
    raw_dir = args.raw or Path("data/raw") / args.source
    out_dir = args.out or Path("data/ingested") / args.source
    log.info("reading %s with %d worker(s)", raw_dir, args.workers)

    manifest = ingest_source(args.source, raw_dir, out_dir, limits, settings, args.workers)

    counts = manifest.groupby(["status", "reason"]).size()
    for (status, reason), count in counts.items():
        if status != "accepted":
            log.warning("%s: %d file(s) %s (%s); see %s", args.source, count, status, reason,
                        out_dir / "manifest.csv")
    accepted = int((manifest["status"] == "accepted").sum())
    log.info("%s: %d of %d file(s) accepted into %s", args.source, accepted, len(manifest), out_dir)


if __name__ == "__main__":
    main()
