"""Run an exported classifier with onnxruntime, configured only by the model's metadata.

Needs onnxruntime, numpy and Pillow, never torch, so a deployment can use it as it is.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from modisch.preprocess import preprocess

PREFIX = "modisch."


def write_metadata(path: Path, entries: dict) -> None:
    """Add ``modisch.*`` metadata entries to an ONNX file in place (JSON-encoded values)."""
    # Imported here so that running a model needs onnxruntime only.
    import onnx

    model = onnx.load(str(path))
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        text = json.dumps(value, sort_keys=True)
        if PREFIX + key in existing:
            existing[PREFIX + key].value = text
        else:
            model.metadata_props.add(key=PREFIX + key, value=text)
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict:
    """Return the ``modisch.*`` metadata entries of an ONNX file, decoded."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _decode(session.get_modelmeta().custom_metadata_map)


def _decode(custom: dict[str, str]) -> dict:
    return {key[len(PREFIX):]: json.loads(value)
            for key, value in custom.items() if key.startswith(PREFIX)}


class OnnxClassifier:
    """An exported classifier: class names, preprocessing and threshold from its metadata."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.metadata = _decode(self.session.get_modelmeta().custom_metadata_map)
        missing = {"classes", "preprocessing", "output"} - set(self.metadata)
        if missing:
            raise SystemExit(f"{path}: ONNX metadata lacks {', '.join(sorted(missing))}; "
                             f"export it with stages/export.py.")
        self.classes: list[str] = self.metadata["classes"]
        self.preprocessing: dict = self.metadata["preprocessing"]
        self.threshold: float | None = self.metadata.get("threshold")
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """Return class probabilities, one row per image, columns in ``self.classes`` order."""
        batch = np.stack([preprocess(image, self.preprocessing) for image in images])
        outputs = self.session.run(None, {self.input_name: batch})[0]
        if self.metadata["output"] == "logits":
            outputs = np.exp(outputs - outputs.max(axis=1, keepdims=True))
            outputs /= outputs.sum(axis=1, keepdims=True)
        return outputs.astype(np.float32)
