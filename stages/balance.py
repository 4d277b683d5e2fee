"""Lay out the dataset folders and oversample the train split.

Reads   data/split/manifest.csv, data/ingested/<source>/images/
Writes  data/dataset/{train,val,test}/<class>/*.jpg   the folder layout ultralytics reads
        data/dataset/index.csv   one row per dataset file: split, class, source, source path,
                                 and the file it was augmented from (empty for originals)
        metrics/balance.json     train images per class before and after oversampling
Params  classes, balance.method, balance.target, balance.seed, balance.augment.*

Only the train split is oversampled, and only with augmented copies of train images, so
no copy of a val or test photo can reach training. Val and test are copied unchanged.
Every class gets a folder in every split, even an empty one, so class indices never
depend on which folders happen to exist.

Run alone:  python stages/balance.py
"""

import argparse
import io
import logging
import random
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image
from modisch.progress import progress

from modisch.augment import AugmentSettings, augment
from modisch.images import encode_jpeg
from modisch.outputs import read_csv, staged_dir, write_json
from modisch.params import load_params

log = logging.getLogger("balance")

SPLITS = ("train", "val", "test")
METHODS = ("oversample", "none")
JPEG_QUALITY = 95


def dataset_name(row: pd.Series) -> str:
    """Name a dataset file after its source and stored image, unique across sources."""
    return f"{row['source']}-{Path(row['image']).stem}.jpg"


def oversample_target(counts: dict[str, int], target) -> int:
    """Return the image count every train class is filled up to."""
    if target == "max":
        return max(counts.values(), default=0)
    if isinstance(target, int) and target > 0:
        return target
    raise SystemExit(f"params.yaml: balance.target is {target!r}; use 'max' or a positive integer.")


def copy_originals(rows: pd.DataFrame, ingested: Path, out: Path) -> list[dict]:
    """Copy the stored images of ``rows`` into ``out/<split>/<class>/``; return index rows."""
    index = []
    for _, row in progress(rows.iterrows(), total=len(rows), desc="copy", unit="img"):
        name = dataset_name(row)
        target = out / row["split"] / row["class"] / name
        shutil.copyfile(ingested / row["source"] / row["image"], target)
        index.append({"file": f"{row['split']}/{row['class']}/{name}", "split": row["split"],
                      "class": row["class"], "source": row["source"], "path": row["path"],
                      "augmented_from": ""})
    return index


def add_augmented_copies(train: pd.DataFrame, classes: list[str], target: int, seed: int,
                         settings: AugmentSettings, ingested: Path, out: Path) -> list[dict]:
    """Write augmented copies of train images until each class reaches ``target``."""
    index = []
    needed = {c: max(0, target - int((train["class"] == c).sum())) for c in classes}
    bar = progress(total=sum(needed.values()), desc="oversample", unit="img")
    for class_name in classes:
        originals = train[train["class"] == class_name].sort_values(["source", "path"])
        if originals.empty:
            log.warning("train has no images of %s, so it stays empty; add data for it or "
                        "check the class maps", class_name)
        if needed[class_name] == 0 or originals.empty:
            continue
        # One generator per class, so adding a class does not change the copies of others.
        rng = random.Random(f"{seed}:{class_name}")
        order = list(originals.index)
        rng.shuffle(order)
        for number in range(needed[class_name]):
            row = originals.loc[order[number % len(order)]]
            with Image.open(ingested / row["source"] / row["image"]) as image:
                copy = augment(image.convert("RGB"), settings, rng)
            name = f"{Path(dataset_name(row)).stem}-aug{number:05d}.jpg"
            (out / "train" / class_name / name).write_bytes(encode_jpeg(copy, JPEG_QUALITY))
            index.append({"file": f"train/{class_name}/{name}", "split": "train",
                          "class": class_name, "source": row["source"], "path": row["path"],
                          "augmented_from": f"train/{class_name}/{dataset_name(row)}"})
            bar.update(1)
    bar.close()
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--split-manifest", type=Path, default=Path("data/split/manifest.csv"))
    parser.add_argument("--ingested", type=Path, default=Path("data/ingested"))
    parser.add_argument("--out", type=Path, default=Path("data/dataset"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/balance.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = load_params(args.params)
    classes = list(params["classes"])
    settings = params["balance"]
    if settings["method"] not in METHODS:
        raise SystemExit(f"params.yaml: balance.method is {settings['method']!r}; use one of "
                         f"{', '.join(METHODS)}.")

    manifest = read_csv(args.split_manifest)
    kept = manifest[manifest["split"] != ""]
    train = kept[kept["split"] == "train"]
    before = {c: int((train["class"] == c).sum()) for c in classes}
    log.info("train %d, val %d, test %d image(s) from %s", len(train),
             int((kept["split"] == "val").sum()), int((kept["split"] == "test").sum()),
             args.split_manifest)

    with staged_dir(args.out) as staging:
        for split in SPLITS:
            for class_name in classes:
                (staging / split / class_name).mkdir(parents=True)
        index = copy_originals(kept.sort_values(["split", "class", "source", "path"]),
                               args.ingested, staging)
        target = 0
        if settings["method"] == "oversample":
            target = oversample_target(before, settings["target"])
            augment_settings = AugmentSettings(**{k: float(v) for k, v in settings["augment"].items()})
            index += add_augmented_copies(train, classes, target, int(settings["seed"]),
                                          augment_settings, args.ingested, staging)
        pd.DataFrame(index).to_csv(staging / "index.csv", index=False, lineterminator="\n")

    after = {c: before[c] + sum(1 for r in index if r["class"] == c and r["augmented_from"])
             for c in classes}
    write_json(args.metrics, {"method": settings["method"], "target": target,
                              "train_before": before, "train_after": after,
                              "augmented": sum(after.values()) - sum(before.values())})
    log.info("train split: %d original and %d augmented image(s) in %s",
             sum(before.values()), sum(after.values()) - sum(before.values()), args.out)


if __name__ == "__main__":
    main()
