"""Tests for the remap stage: class maps applied to ingested manifests."""

import logging
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import remap
from remap import check_class_map, remap_source, report_labels

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["blazer", "dress", "jacket", "pants"]
CLASS_MAP = {"Blazer": "blazer", "Jaket": "jacket", "Jaket_Denim": "jacket", "Gaun": "dress"}


def manifest_of(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """Build an ingested manifest from (label, status) pairs."""
    return pd.DataFrame([
        {"source": "clothes", "path": f"c.zip/{label}/{index}.jpg", "label": label,
         "status": status, "reason": "" if status == "accepted" else "corrupt", "detail": "",
         "image": f"images/{index}.jpg" if status == "accepted" else ""}
        for index, (label, status) in enumerate(rows)
    ])


@pytest.mark.parametrize(
    ("label", "status", "expected_class", "expected_status"),
    [
        ("Blazer", "accepted", "blazer", "accepted"),
        ("Jaket", "accepted", "jacket", "accepted"),
        ("Jaket_Denim", "accepted", "jacket", "accepted"),
        ("Celana", "accepted", "", "unmapped"),
        ("Blazer", "rejected", "", "rejected"),
        ("", "skipped", "", "skipped"),
    ],
)
def test_remap_source_row(label, status, expected_class, expected_status):
    remapped = remap_source(manifest_of([(label, status)]), CLASS_MAP)

    assert remapped.loc[0, "class"] == expected_class
    assert remapped.loc[0, "status"] == expected_status


def test_remap_unmapped_names_folder():
    remapped = remap_source(manifest_of([("Celana", "accepted")]), CLASS_MAP)

    assert remapped.loc[0, "reason"] == "unmapped_label"
    assert "Celana" in remapped.loc[0, "detail"]


def test_remap_keeps_every_row():
    manifest = manifest_of([("Blazer", "accepted"), ("Celana", "accepted"), ("Gaun", "rejected")])

    remapped = remap_source(manifest, CLASS_MAP)

    assert list(remapped["path"]) == list(manifest["path"])
    assert "class" not in manifest.columns


def test_report_labels_warns_unmapped_folder(caplog):
    remapped = remap_source(manifest_of([("Celana", "accepted"), ("Celana", "accepted")]),
                            {"Celana_Panjang": "pants"})

    with caplog.at_level(logging.WARNING, logger="remap"):
        report_labels("clothes", remapped, {"Celana_Panjang": "pants"})

    unmapped = [r.getMessage() for r in caplog.records if "'Celana'" in r.getMessage()]
    assert len(unmapped) == 1
    assert "2 image(s)" in unmapped[0]
    assert "sources.clothes.class_map" in unmapped[0]


def test_report_labels_warns_absent_map_entry(caplog):
    remapped = remap_source(manifest_of([("Blazer", "accepted")]), CLASS_MAP)

    with caplog.at_level(logging.WARNING, logger="remap"):
        report_labels("clothes", remapped, CLASS_MAP)

    messages = [r.getMessage() for r in caplog.records]
    assert any("'Gaun'" in m for m in messages)
    assert any("'Jaket_Denim'" in m for m in messages)
    assert not any("'Blazer'" in m for m in messages)


@pytest.mark.parametrize(
    ("class_map", "named"),
    [
        ({"Blazer": "blazer", "Gaun": "gown"}, "sources.clothes.class_map.Gaun"),
        ({"Gaun": None}, "sources.clothes.class_map.Gaun"),
        ({"Jaket": "Jacket"}, "sources.clothes.class_map.Jaket"),
        ({}, "sources.clothes.class_map"),
        (None, "sources.clothes.class_map"),
        (["Blazer"], "sources.clothes.class_map"),
    ],
)
def test_check_class_map_invalid_exits(class_map, named):
    with pytest.raises(SystemExit, match=named.replace(".", r"\.")):
        check_class_map("clothes", class_map, CLASSES)


def test_check_class_map_string_keys():
    assert check_class_map("shoes", {1: "dress"}, CLASSES) == {"1": "dress"}


def write_params(path: Path, class_map: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["sources"] = {"clothes": {"kaggle": None, "path": None, "class_map": class_map}}
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def run_main(monkeypatch, *arguments: str) -> None:
    monkeypatch.setattr(sys, "argv", ["remap.py", *arguments])
    remap.main()


def test_remap_main_writes_labelled(tmp_path, monkeypatch, caplog):
    ingested = tmp_path / "ingested"
    (ingested / "clothes").mkdir(parents=True)
    manifest_of([("Blazer", "accepted"), ("Rok", "accepted"), ("Gaun", "rejected")]).to_csv(
        ingested / "clothes" / "manifest.csv", index=False)
    params = write_params(tmp_path / "params.yaml", {"Blazer": "blazer", "Gaun": "dress"})
    out = tmp_path / "labelled" / "manifest.csv"

    with caplog.at_level(logging.WARNING, logger="remap"):
        run_main(monkeypatch, "--params", str(params), "--ingested", str(ingested),
                 "--out", str(out))

    labelled = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(labelled["class"]) == ["blazer", "", ""]
    assert list(labelled["status"]) == ["accepted", "unmapped", "rejected"]
    assert any("'Rok'" in r.getMessage() for r in caplog.records)


def test_remap_main_invalid_target_exits(tmp_path, monkeypatch):
    params = write_params(tmp_path / "params.yaml", {"Blazer": "blazer", "Gaun": "gown"})

    with pytest.raises(SystemExit, match=r"sources\.clothes\.class_map\.Gaun"):
        run_main(monkeypatch, "--params", str(params), "--ingested", str(tmp_path),
                 "--out", str(tmp_path / "out.csv"))

    assert not (tmp_path / "out.csv").exists()
