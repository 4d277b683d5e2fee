"""Tests for the split stage on the fixture photos plus generated exact, near and conflicting copies."""

import io
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

import split
from ingest import ImageSettings, ingest_source
from modisch.archives import ArchiveLimits
from remap import remap_source
from split import mark_duplicates_and_conflicts

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "replica"
CLOTHES = FIXTURES / "clothes" / "Clothes_Dataset"
SHOES = FIXTURES / "shoes" / "shoeTypeClassifierDataset"
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
LIMITS = ArchiveLimits(max_total_bytes=10**10, max_entry_bytes=10**8, max_ratio=200)
SETTINGS = ImageSettings(max_pixels=40_000_000, min_side=32, max_side=512, jpeg_quality=95)


def first_photo(folder: str) -> Path:
    return sorted((CLOTHES / folder).glob("*.jpg"))[0]


BLAZER = first_photo("Blazer")
GAUN = first_photo("Gaun")
KAOS = first_photo("Kaos")

# Different catalogue photos whose perceptual hashes are 4 bits apart (measured on the
# fixtures), so only the thumbnail check keeps them apart.
CATALOGUE_PAIRS = [
    ("clothes/Clothes_Dataset/Jeans/11234.jpg", "clothes/Clothes_Dataset/Jeans/11239.jpg"),
    ("shoes/shoeTypeClassifierDataset/training/flip_flops/image101.jpeg",
     "shoes/shoeTypeClassifierDataset/training/sandals/image106.jpeg"),
]


def near_copy(path: Path) -> bytes:
    """Return the photo resized to 70% and re-encoded at a lower JPEG quality."""
    with Image.open(path) as photo:
        small = photo.convert("RGB").resize((photo.width * 7 // 10, photo.height * 7 // 10))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def build_sources(raw: Path) -> None:
    (raw / "clothes").mkdir(parents=True)
    (raw / "shoes").mkdir()
    (raw / "clothes" / "Clothes_Dataset").symlink_to(CLOTHES, target_is_directory=True)
    (raw / "shoes" / "shoeTypeClassifierDataset").symlink_to(SHOES, target_is_directory=True)

    # "extra" sorts after "Clothes_Dataset", so these copies come later in the manifest.
    extra = {
        "Blazer/exact_copy.jpg": BLAZER.read_bytes(),
        "Gaun/near_copy.jpg": near_copy(GAUN),
        "Kaos/again.jpg": KAOS.read_bytes(),
        "Rok/conflict.jpg": KAOS.read_bytes(),
    }
    for name, data in extra.items():
        path = raw / "clothes" / "extra" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Ingest and remap both sources once; return (ingested dir, labelled manifest file)."""
    base = tmp_path_factory.mktemp("split")
    build_sources(base / "raw")
    frames = []
    for source in ("clothes", "shoes"):
        manifest = ingest_source(source, base / "raw" / source, base / "ingested" / source,
                                 LIMITS, SETTINGS, workers=2)
        frames.append(remap_source(manifest, PARAMS["sources"][source]["class_map"]))
    path = base / "labelled.csv"
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return base / "ingested", path


def run_split(labelled, out_dir: Path, monkeypatch, **changes) -> tuple[pd.DataFrame, dict]:
    """Run the split stage's main() with split params changed; return manifest and metrics."""
    ingested, labelled_csv = labelled
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["split"].update(changes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", [
        "split.py", "--params", str(out_dir / "params.yaml"), "--labelled", str(labelled_csv),
        "--ingested", str(ingested), "--out", str(out_dir / "manifest.csv"),
        "--metrics", str(out_dir / "data.json"), "--plot", str(out_dir / "class_counts.csv")])
    split.main()
    manifest = pd.read_csv(out_dir / "manifest.csv", dtype=str, keep_default_na=False)
    metrics = json.loads((out_dir / "data.json").read_text(encoding="utf-8"))
    return manifest, metrics


@pytest.fixture(scope="module")
def dropped(labelled, tmp_path_factory):
    """The split under the default params (conflicts: drop, seed 42)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_split(labelled, tmp_path_factory.mktemp("drop"), monkeypatch)


def row_of(manifest: pd.DataFrame, path: str) -> pd.Series:
    rows = manifest[manifest["path"] == path]
    assert len(rows) == 1, f"{path}: expected one row, found {len(rows)}"
    return rows.iloc[0]


def fixture_path(photo: Path) -> str:
    return f"Clothes_Dataset/{photo.parent.name}/{photo.name}"


def test_split_exact_duplicate_marked(dropped):
    manifest, _ = dropped

    original = row_of(manifest, fixture_path(BLAZER))
    copy = row_of(manifest, "extra/Blazer/exact_copy.jpg")

    assert original["group"] == copy["group"]
    assert original["status"] == "accepted"
    assert original["split"] in ("train", "val", "test")
    assert copy["status"] == "duplicate"
    assert copy["reason"] == "exact_duplicate"
    assert copy["split"] == ""
    assert fixture_path(BLAZER) in copy["detail"]


def test_split_near_copy_same_group(dropped):
    manifest, _ = dropped

    original = row_of(manifest, fixture_path(GAUN))
    copy = row_of(manifest, "extra/Gaun/near_copy.jpg")

    assert original["pixel_sha256"] != copy["pixel_sha256"]
    assert original["group"] == copy["group"]
    assert (original["status"], copy["status"]) == ("accepted", "accepted")
    assert original["split"] == copy["split"] != ""


@pytest.mark.parametrize(("first", "second"), CATALOGUE_PAIRS)
def test_split_catalogue_pair_not_grouped(dropped, first, second):
    manifest, _ = dropped
    relative = [path.split("/", 1)[1] for path in (first, second)]

    rows = [row_of(manifest, path) for path in relative]

    assert rows[0]["group"] != rows[1]["group"]
    assert (rows[0]["status"], rows[1]["status"]) == ("accepted", "accepted")


@pytest.mark.parametrize(("first", "second"), CATALOGUE_PAIRS)
def test_split_catalogue_pair_grouped_without_thumbnails(labelled, first, second):
    ingested, labelled_csv = labelled
    manifest = pd.read_csv(labelled_csv, dtype=str, keep_default_na=False)

    # A difference limit of 1.0 accepts every candidate, which shows that the hashes alone
    # would have grouped the pair.
    grouped = mark_duplicates_and_conflicts(manifest, ingested, 4, 1.0, "drop")

    groups = [row_of(grouped, path.split("/", 1)[1])["group"] for path in (first, second)]
    assert groups[0] == groups[1]


def test_split_conflict_drop_whole_group(dropped):
    manifest, metrics = dropped

    rows = [row_of(manifest, path) for path in
            (fixture_path(KAOS), "extra/Kaos/again.jpg", "extra/Rok/conflict.jpg")]

    assert len({row["group"] for row in rows}) == 1
    for row in rows:
        assert row["status"] == "conflict"
        assert row["reason"] == "label_conflict"
        assert row["split"] == ""
        assert "skirt (1)" in row["detail"]
        assert "t-shirt (2)" in row["detail"]
    assert metrics["conflicts"] == 3


def test_split_conflict_keep_majority(labelled, tmp_path, monkeypatch):
    manifest, metrics = run_split(labelled, tmp_path, monkeypatch, conflicts="keep_majority")

    original = row_of(manifest, fixture_path(KAOS))
    again = row_of(manifest, "extra/Kaos/again.jpg")
    loser = row_of(manifest, "extra/Rok/conflict.jpg")

    assert (original["status"], original["class"]) == ("accepted", "t-shirt")
    assert original["split"] != ""
    assert again["status"] == "duplicate"
    assert loser["status"] == "conflict"
    assert loser["split"] == ""
    assert metrics["conflicts"] == 1


def test_split_same_seed_identical(labelled, dropped, tmp_path, monkeypatch):
    run_split(labelled, tmp_path, monkeypatch)

    first = pd.DataFrame(dropped[0])
    second = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(first, second)


def test_split_other_seed_differs(labelled, dropped, tmp_path, monkeypatch):
    manifest, _ = run_split(labelled, tmp_path, monkeypatch, seed=7)

    assert list(manifest["path"]) == list(dropped[0]["path"])
    assert list(manifest["split"]) != list(dropped[0]["split"])


def test_split_stratified_val_and_test(dropped):
    manifest, _ = dropped
    kept = manifest[manifest["split"] != ""]
    counts = kept.groupby("class")["split"].value_counts().unstack(fill_value=0)
    large = counts[counts.sum(axis=1) >= 10]

    assert len(large) >= 5, "the fixtures should give several classes of 10 or more images"
    for class_name, row in large.iterrows():
        assert row.get("val", 0) >= 1, class_name
        assert row.get("test", 0) >= 1, class_name
        assert row.get("train", 0) > row.get("val", 0) + row.get("test", 0), class_name


def test_split_groups_never_straddle(dropped):
    manifest, _ = dropped
    kept = manifest[manifest["split"] != ""]

    splits_per_group = kept.groupby("group")["split"].nunique()

    assert (splits_per_group == 1).all()


def test_split_only_usable_rows_assigned(dropped):
    manifest, _ = dropped
    usable = (manifest["status"] == "accepted") & (manifest["class"] != "")

    assert (manifest.loc[usable, "split"] != "").all()
    assert (manifest.loc[~usable, "split"] == "").all()


def test_split_metrics_consistent(dropped):
    manifest, metrics = dropped
    usable = int(((manifest["status"] == "accepted") & (manifest["class"] != "")).sum())

    assert sum(metrics["images"].values()) == usable
    assert sum(metrics["images"].values()) + metrics["dropped"] == metrics["files"]
    assert metrics["files"] == len(manifest)
    assert sum(metrics["dropped_by_reason"].values()) == metrics["dropped"]
    assert metrics["duplicates"] == int((manifest["status"] == "duplicate").sum())
    assert metrics["dropped_by_reason"]["duplicate/exact_duplicate"] == metrics["duplicates"]
    for name, count in metrics["images"].items():
        assert sum(metrics["per_class"][name].values()) == count
        assert sum(source[name] for source in metrics["per_source"].values()) == count


def test_split_metrics_per_source_class(dropped):
    manifest, metrics = dropped
    kept = manifest[manifest["split"] != ""]

    assert set(metrics["per_source_class"]) == set(kept["source"])
    for source, splits in metrics["per_source_class"].items():
        for name, counts in splits.items():
            rows = kept[(kept["source"] == source) & (kept["split"] == name)]
            assert sum(counts.values()) == len(rows)
            assert counts == {c: int((rows["class"] == c).sum()) for c in counts}


def test_split_class_counts_plot(labelled, tmp_path, monkeypatch):
    _, metrics = run_split(labelled, tmp_path, monkeypatch)

    table = pd.read_csv(tmp_path / "class_counts.csv")

    assert len(table) == 3 * len(PARAMS["classes"])
    for name, count in metrics["images"].items():
        assert table[table["split"] == name]["images"].sum() == count


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"val": 0.5, "test": 0.5}, r"split\.val \(0\.5\) and split\.test \(0\.5\)"),
        ({"val": -0.1}, r"split\.val \(-0\.1\)"),
        ({"conflicts": "vote"}, r"split\.conflicts is 'vote'"),
    ],
)
def test_split_invalid_params_exit(labelled, tmp_path, monkeypatch, changes, message):
    with pytest.raises(SystemExit, match=message):
        run_split(labelled, tmp_path, monkeypatch, **changes)

    assert not (tmp_path / "manifest.csv").exists()
