"""Split the labelled images into train, val and test, keeping duplicate groups together.

Reads   data/labelled/manifest.csv, data/ingested/<source>/images/ (to confirm near copies)
Writes  data/split/manifest.csv   every file of every source with its final status and split
        metrics/data.json         counts per class x split x source, and drops by reason
        plots/data/class_counts.csv   images per class and split, for dvc plots
Params  classes, split.val, split.test, split.seed, split.near_duplicate_distance,
        split.near_duplicate_max_difference, split.conflicts

Exact copies (same decoded pixels) and near copies (perceptual hashes within
``near_duplicate_distance`` bits, confirmed by 32 x 32 thumbnails differing by at most
``near_duplicate_max_difference`` on average) form one group, and a group never straddles two splits.
Within a group, later exact copies of an image are marked ``duplicate``. A group whose
images carry more than one class is a label conflict. Policy ``drop`` marks the whole
group ``conflict``, and ``keep_majority`` keeps the images of the most common class.
The split is stratified by class and depends only on the manifest and the seed.

Run alone:  python stages/split.py
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from modisch.duplicates import group_duplicates, thumbnail_matcher
from modisch.outputs import read_csv, write_csv, write_json
from modisch.params import load_params

log = logging.getLogger("split")

SPLITS = ("train", "val", "test")
CONFLICT_POLICIES = ("drop", "keep_majority")


def mark_duplicates_and_conflicts(manifest: pd.DataFrame, ingested: Path, max_distance: int,
                                  max_difference: float, policy: str) -> pd.DataFrame:
    """Add a ``group`` column and mark duplicate and conflicting rows."""
    manifest = manifest.copy()
    manifest["group"] = ""
    labelled = manifest.index[manifest["class"] != ""]
    rows = manifest.loc[labelled]
    paths = [ingested / source / image for source, image in zip(rows["source"], rows["image"])]
    group_ids = group_duplicates(list(rows["pixel_sha256"]), list(rows["phash"]), max_distance,
                                 thumbnail_matcher(paths, max_difference))
    manifest.loc[labelled, "group"] = [f"g{group:06d}" for group in group_ids]

    grouped = manifest.loc[labelled].groupby("group", sort=True)
    for _, members in grouped:
        if len(members) < 2:
            continue
        classes = members["class"].value_counts()
        if len(classes) > 1:
            keep = _resolve_conflict(classes, policy)
            losers = members[members["class"] != keep] if keep else members
            listing = ", ".join(f"{c} ({n})" for c, n in sorted(classes.items()))
            manifest.loc[losers.index, ["status", "reason", "detail"]] = [
                "conflict", "label_conflict", f"same image labelled {listing}"]
            members = members.drop(losers.index)

        first_of_pixels = members.drop_duplicates("pixel_sha256")
        copies = members.index.difference(first_of_pixels.index)
        for index in copies:
            original = first_of_pixels[
                first_of_pixels["pixel_sha256"] == manifest.at[index, "pixel_sha256"]].iloc[0]
            manifest.loc[index, ["status", "reason", "detail"]] = [
                "duplicate", "exact_duplicate",
                f"same pixels as {original['source']}:{original['path']}"]
    return manifest


def _resolve_conflict(classes: pd.Series, policy: str) -> str:
    """Return the class that survives a conflict, or an empty string to drop the group."""
    if policy == "drop":
        return ""
    top = classes[classes == classes.max()]
    # A tie has no majority, so the group is dropped like under 'drop'.
    return str(top.index[0]) if len(top) == 1 else ""


def assign_splits(manifest: pd.DataFrame, val: float, test: float, seed: int) -> pd.Series:
    """Return a split per row for accepted rows, stratified by class, whole groups at a time."""
    split = pd.Series("", index=manifest.index)
    usable = manifest[(manifest["status"] == "accepted") & (manifest["class"] != "")]
    rng = np.random.default_rng(seed)

    for class_name in sorted(usable["class"].unique()):
        rows = usable[usable["class"] == class_name]
        members = rows.groupby("group", sort=True).groups
        groups = rows.groupby("group", sort=True).size()
        order = groups.index[rng.permutation(len(groups))]
        total = int(groups.sum())
        target_counts = {"test": round(total * test), "val": round(total * val)}
        assigned_counts = {"test": 0, "val": 0}
        for group in order:
            target = next((name for name in ("test", "val") if assigned_counts[name] < target_counts[name]), "train")
            if target != "train":
                assigned_counts[target] += int(groups[group])
            split[members[group]] = target
    return split


def summarise(manifest: pd.DataFrame, classes: list[str]) -> dict:
    """Count images per class, split and source, and files dropped per reason."""
    kept = manifest[manifest["split"] != ""]
    per_split = {
        name: {c: int(n) for c, n in kept[kept["split"] == name]["class"].value_counts()
               .reindex(classes, fill_value=0).items()}
        for name in SPLITS
    }
    per_source = {
        source: {name: int((rows["split"] == name).sum()) for name in SPLITS}
        for source, rows in kept.groupby("source", sort=True)
    }
    per_source_class = {
        source: {name: {c: int(n) for c, n in rows[rows["split"] == name]["class"]
                        .value_counts().reindex(classes, fill_value=0).items()}
                 for name in SPLITS}
        for source, rows in kept.groupby("source", sort=True)
    }
    dropped = manifest[manifest["split"] == ""]
    by_reason = {
        f"{status}/{reason}": int(n)
        for (status, reason), n in dropped.groupby(["status", "reason"], sort=True).size().items()
    }
    return {
        "files": int(len(manifest)),
        "images": {name: int((kept["split"] == name).sum()) for name in SPLITS},
        "duplicates": int((manifest["status"] == "duplicate").sum()),
        "conflicts": int((manifest["status"] == "conflict").sum()),
        "dropped": int(len(dropped)),
        "dropped_by_reason": by_reason,
        "per_source": per_source,
        "per_class": per_split,
        "per_source_class": per_source_class,
    }


def class_count_table(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Return one row per class and split with its image count."""
    kept = manifest[manifest["split"] != ""]
    counts = kept.groupby(["class", "split"]).size()
    rows = [{"class": c, "split": s, "images": int(counts.get((c, s), 0))}
            for s in SPLITS for c in classes]
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--labelled", type=Path, default=Path("data/labelled/manifest.csv"))
    parser.add_argument("--ingested", type=Path, default=Path("data/ingested"))
    parser.add_argument("--out", type=Path, default=Path("data/split/manifest.csv"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"))
    parser.add_argument("--plot", type=Path, default=Path("plots/data/class_counts.csv"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = load_params(args.params)
    classes = list(params["classes"])
    settings = params["split"]
    val, test = float(settings["val"]), float(settings["test"])
    if val < 0 or test < 0 or val + test >= 1:
        raise SystemExit(f"params.yaml: split.val ({val}) and split.test ({test}) must be "
                         f"non-negative and add up to less than 1.")
    policy = settings["conflicts"]
    if policy not in CONFLICT_POLICIES:
        raise SystemExit(f"params.yaml: split.conflicts is {policy!r}; use one of "
                         f"{', '.join(CONFLICT_POLICIES)}.")

    manifest = read_csv(args.labelled)
    log.info("%d file(s), %d labelled", len(manifest), int((manifest["class"] != "").sum()))
    manifest = mark_duplicates_and_conflicts(
        manifest, args.ingested, int(settings["near_duplicate_distance"]),
        float(settings["near_duplicate_max_difference"]), policy)
    manifest["split"] = assign_splits(manifest, val, test, int(settings["seed"]))

    summary = summarise(manifest, classes)
    for split_name in ("val", "test"):
        empty = [c for c, n in summary["per_class"][split_name].items() if n == 0]
        if empty:
            log.warning("%s has no images of %s; add data or raise split.%s",
                        split_name, ", ".join(empty), split_name)
    write_csv(args.out, manifest)
    write_json(args.metrics, summary)
    write_csv(args.plot, class_count_table(manifest, classes))
    log.info("train %d, val %d, test %d image(s); %d duplicate(s), %d conflict(s), "
             "%d file(s) dropped in all", *summary["images"].values(), summary["duplicates"],
             summary["conflicts"], summary["dropped"])


if __name__ == "__main__":
    main()
