"""Tests for the balance stage: dataset folders, and oversampling of the train split only."""

import hashlib
import json
import logging
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

import balance
from modisch.images import encode_jpeg

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["blazer", "dress", "skirt"]
SPLITS = ("train", "val", "test")

# (class, split, count): blazer is the largest train class, skirt has no images at all.
LAYOUT = [
    ("blazer", "train", 5), ("blazer", "val", 2), ("blazer", "test", 1),
    ("dress", "train", 2), ("dress", "val", 1),
]


def build_split(base: Path) -> tuple[Path, Path]:
    """Write ingested images and a split manifest; return (ingested dir, manifest file)."""
    rows = []
    images = base / "ingested" / "clothes" / "images"
    images.mkdir(parents=True)
    number = 0
    for class_name, split_name, count in LAYOUT:
        for _ in range(count):
            number += 1
            image = Image.new("RGB", (48, 40), (number * 9 % 256, number * 37 % 256, 120))
            (images / f"{number:04d}.jpg").write_bytes(encode_jpeg(image, 95))
            rows.append({"source": "clothes", "path": f"{class_name}/{number}.jpg",
                         "status": "accepted", "class": class_name, "split": split_name,
                         "image": f"images/{number:04d}.jpg"})
    # Rows outside every split (a duplicate and a rejected file) never reach the dataset.
    rows.append({"source": "clothes", "path": "blazer/copy.jpg", "status": "duplicate",
                 "class": "blazer", "split": "", "image": "images/0001.jpg"})
    rows.append({"source": "clothes", "path": "blazer/bad.jpg", "status": "rejected",
                 "class": "", "split": "", "image": ""})
    manifest = base / "split.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return base / "ingested", manifest


def run_balance(base: Path, out: Path, monkeypatch, **changes) -> dict:
    """Run the balance stage's main() with balance params changed; return its metrics."""
    if (base / "split.csv").exists():
        ingested, manifest = base / "ingested", base / "split.csv"
    else:
        ingested, manifest = build_split(base)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["classes"] = CLASSES
    params["balance"].update(changes)
    params_file = out.with_name(out.name + "-params.yaml")
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    metrics = out.with_name(out.name + "-balance.json")
    monkeypatch.setattr(sys, "argv", [
        "balance.py", "--params", str(params_file), "--split-manifest", str(manifest),
        "--ingested", str(ingested), "--out", str(out), "--metrics", str(metrics)])
    balance.main()
    return json.loads(metrics.read_text(encoding="utf-8"))


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def read_index(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False)


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """The dataset under the default balance params: (out dir, metrics, split manifest)."""
    metrics = run_balance(tmp_path, tmp_path / "dataset", monkeypatch)
    manifest = pd.read_csv(tmp_path / "split.csv", dtype=str, keep_default_na=False)
    return tmp_path / "dataset", metrics, manifest


def test_balance_train_filled_to_max(dataset):
    out, metrics, _ = dataset

    counts = {c: len(list((out / "train" / c).iterdir())) for c in CLASSES}

    assert counts == {"blazer": 5, "dress": 5, "skirt": 0}
    assert metrics["target"] == 5
    assert metrics["train_after"] == counts
    assert metrics["train_before"] == {"blazer": 5, "dress": 2, "skirt": 0}
    assert metrics["augmented"] == 3


def test_balance_empty_train_class_warns(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="balance"):
        run_balance(tmp_path, tmp_path / "dataset", monkeypatch)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no images of skirt" in message for message in warnings)
    assert not any("no images of dress" in message for message in warnings)


@pytest.mark.parametrize("split_name", ["val", "test"])
def test_balance_eval_split_exact_copies(dataset, split_name):
    out, _, manifest = dataset
    rows = manifest[manifest["split"] == split_name]
    ingested = out.parent / "ingested" / "clothes"

    files = sorted((out / split_name).rglob("*.jpg"))

    assert len(files) == len(rows)
    assert not any("-aug" in path.name for path in files)
    expected = {hashlib.sha256((ingested / image).read_bytes()).hexdigest() for image in rows["image"]}
    assert {hashlib.sha256(path.read_bytes()).hexdigest() for path in files} == expected


def test_balance_train_originals_byte_identical(dataset):
    out, _, manifest = dataset
    index = read_index(out)
    originals = index[(index["split"] == "train") & (index["augmented_from"] == "")]
    ingested = out.parent / "ingested" / "clothes"
    image_of = dict(zip(manifest["path"], manifest["image"]))

    assert len(originals) == 7
    for _, row in originals.iterrows():
        assert (out / row["file"]).read_bytes() == (ingested / image_of[row["path"]]).read_bytes()


def test_balance_every_class_folder_in_every_split(dataset):
    out, _, _ = dataset

    for split_name in SPLITS:
        assert sorted(p.name for p in (out / split_name).iterdir()) == CLASSES


def test_balance_index_lists_every_file(dataset):
    out, _, _ = dataset
    index = read_index(out)

    on_disk = {str(path.relative_to(out)) for path in out.rglob("*.jpg")}

    assert set(index["file"]) == on_disk
    assert index["file"].is_unique
    augmented = index[index["augmented_from"] != ""]
    assert set(augmented["file"]) == {f for f in on_disk if "-aug" in f}


def test_balance_copies_only_from_train(dataset):
    out, _, manifest = dataset
    index = read_index(out)
    split_of = dict(zip(manifest["path"], manifest["split"]))
    augmented = index[index["augmented_from"] != ""]

    assert len(augmented) == 3
    for _, row in augmented.iterrows():
        assert row["split"] == "train"
        assert split_of[row["path"]] == "train"
        assert row["augmented_from"].startswith(f"train/{row['class']}/")
        assert (out / row["augmented_from"]).is_file()
        source = index[index["file"] == row["augmented_from"]].iloc[0]
        assert source["path"] == row["path"]


def test_balance_same_seed_identical(dataset, monkeypatch):
    out, _, _ = dataset
    again = out.with_name("again")

    run_balance(out.parent, again, monkeypatch)

    assert file_hashes(again) == file_hashes(out)


def test_balance_other_seed_differs(dataset, monkeypatch):
    out, _, _ = dataset
    other = out.with_name("other")

    run_balance(out.parent, other, monkeypatch, seed=1)

    # File names follow the shuffled order of originals, so compare the image contents.
    first, second = file_hashes(out / "train"), file_hashes(other / "train")
    assert len(first) == len(second)
    assert sorted(first.values()) != sorted(second.values())


def test_balance_method_none_no_copies(tmp_path, monkeypatch):
    out = tmp_path / "dataset"

    metrics = run_balance(tmp_path, out, monkeypatch, method="none")

    assert not any("-aug" in path.name for path in out.rglob("*.jpg"))
    assert (read_index(out)["augmented_from"] == "").all()
    assert metrics["augmented"] == 0
    assert metrics["train_after"] == metrics["train_before"]


def test_balance_integer_target(tmp_path, monkeypatch):
    out = tmp_path / "dataset"

    run_balance(tmp_path, out, monkeypatch, target=3)

    counts = {c: len(list((out / "train" / c).iterdir())) for c in CLASSES}
    # A class above the target keeps all its images; nothing is removed.
    assert counts == {"blazer": 5, "dress": 3, "skirt": 0}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "smote"}, r"balance\.method is 'smote'"),
        ({"target": "half"}, r"balance\.target is 'half'"),
        ({"target": 0}, r"balance\.target is 0"),
        ({"target": -4}, r"balance\.target is -4"),
        ({"target": 2.5}, r"balance\.target is 2\.5"),
    ],
)
def test_balance_invalid_params_exit(tmp_path, monkeypatch, changes, message):
    out = tmp_path / "dataset"

    with pytest.raises(SystemExit, match=message):
        run_balance(tmp_path, out, monkeypatch, **changes)

    assert not out.exists()
    assert not out.with_name("dataset.partial").exists()
