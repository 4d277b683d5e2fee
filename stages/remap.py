"""Apply each source's class map to its ingested manifest.

Reads   data/ingested/<source>/manifest.csv for every source in params.yaml
Writes  data/labelled/manifest.csv   every row of every source, with a ``class`` column
Params  classes, sources (each source's class_map)

Accepted files whose source label has no entry in the class map become ``unmapped``.
A class map target that is not in ``classes`` stops the stage with the entry named.

Run alone:  python stages/remap.py
"""

import argparse
import logging
from pathlib import Path

import pandas as pd

from modisch.outputs import read_csv, write_csv
from modisch.params import load_params

log = logging.getLogger("remap")


def check_class_map(source: str, class_map: dict, classes: list[str]) -> dict[str, str]:
    """Return the class map with string keys, or stop naming the first invalid entry."""
    if not isinstance(class_map, dict) or not class_map:
        raise SystemExit(f"params.yaml: sources.{source}.class_map must be a non-empty mapping "
                         f"of source folder names to classes.")
    for label, target in class_map.items():
        if target not in classes:
            raise SystemExit(
                f"params.yaml: sources.{source}.class_map.{label} maps to {target!r}, which is "
                f"not in 'classes'. Use one of: {', '.join(classes)}."
            )
    return {str(label): target for label, target in class_map.items()}


def remap_source(manifest: pd.DataFrame, class_map: dict[str, str]) -> pd.DataFrame:
    """Add the target ``class`` to accepted rows; mark accepted rows without one unmapped."""
    manifest = manifest.copy()
    accepted = manifest["status"] == "accepted"
    manifest["class"] = manifest["label"].map(class_map).fillna("").where(accepted, "")

    unmapped = accepted & (manifest["class"] == "")
    manifest.loc[unmapped, "status"] = "unmapped"
    manifest.loc[unmapped, "reason"] = "unmapped_label"
    manifest.loc[unmapped, "detail"] = "no class map entry for folder " + manifest.loc[unmapped, "label"]
    return manifest


def report_labels(source: str, manifest: pd.DataFrame, class_map: dict[str, str]) -> None:
    """Warn about class map entries the source lacks and source folders the map lacks."""
    present = set(manifest["label"])
    for label in sorted(set(class_map) - present):
        log.warning("%s: class map names folder %r, but the source has no files in it",
                    source, label)
    unmapped = manifest[manifest["status"] == "unmapped"]["label"].value_counts()
    for label, count in sorted(unmapped.items()):
        log.warning("%s: folder %r (%d image(s)) is not in sources.%s.class_map and is left out",
                    source, label, count, source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--ingested", type=Path, default=Path("data/ingested"),
                        help="folder of ingested sources (default: data/ingested)")
    parser.add_argument("--out", type=Path, default=Path("data/labelled/manifest.csv"),
                        help="output manifest (default: data/labelled/manifest.csv)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = load_params(args.params)
    classes = list(params["classes"])
    frames = []
    for source, settings in params["sources"].items():
        class_map = check_class_map(source, settings.get("class_map"), classes)
        manifest = read_csv(args.ingested / source / "manifest.csv")
        log.info("%s: %d file(s), %d class map entries", source, len(manifest), len(class_map))
        remapped = remap_source(manifest, class_map)
        report_labels(source, remapped, class_map)
        frames.append(remapped)

    labelled = pd.concat(frames, ignore_index=True)
    write_csv(args.out, labelled)
    kept = labelled[labelled["class"] != ""]["class"].value_counts()
    missing = [name for name in classes if name not in kept]
    if missing:
        log.warning("no images for class(es) %s; check the class maps", ", ".join(missing))
    log.info("%d labelled image(s) in %d class(es) written to %s", int(kept.sum()), len(kept), args.out)


if __name__ == "__main__":
    main()
