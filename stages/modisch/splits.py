"""Read the val and test splits of the built dataset and run a classifier over them."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from modisch.progress import progress

from modisch.outputs import read_csv


def read_split(dataset: Path, split: str, classes: list[str]) -> pd.DataFrame:
    """Return the original images of one split: ``file``, ``class``, ``label``, ``source``.

    ``label`` is the index of the class in ``classes``, the model's output order.
    """
    index = read_csv(dataset / "index.csv")
    rows = index[(index["split"] == split) & (index["augmented_from"] == "")].copy()
    unknown = sorted(set(rows["class"]) - set(classes))
    if unknown:
        raise SystemExit(f"{dataset / 'index.csv'}: classes {unknown} are not among the "
                         f"model's classes {classes}; re-run train and export.")
    rows["label"] = rows["class"].map({name: i for i, name in enumerate(classes)}).astype(int)
    rows["file"] = [str(dataset / name) for name in rows["file"]]
    return rows.sort_values("file").reset_index(drop=True)


def predict_files(predict, files: list[str], batch_size: int, desc: str) -> np.ndarray:
    """Return ``predict``'s probabilities for image files, in batches, with a progress bar."""
    outputs = []
    for start in progress(range(0, len(files), batch_size), desc=desc, unit="batch"):
        images = []
        for name in files[start:start + batch_size]:
            with Image.open(name) as image:
                images.append(image.convert("RGB"))
        outputs.append(predict(images))
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
