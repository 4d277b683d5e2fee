"""Classify image files with the exported ONNX model and write the predictions as CSV or JSON.

Reads   models/model.onnx (or --model)   class names, preprocessing, output kind and
                                         confidence threshold from its modisch.* metadata
        the image files, folders (searched recursively) and glob patterns given as arguments
Writes  one row per file found, to stdout or --output:
        file        path of the image, as found from the argument
        label       most probable class
        confidence  probability of that class, rounded to 6 decimal places
        top_k       the --top-k most probable classes, most probable first: a list of
                    {label, probability} in JSON, "shirt:0.9100;polo:0.0500" in CSV
        uncertain   true when confidence is below the threshold (--threshold, else the
                    model's); false when neither gives one
        error       "reason: detail" for a file that could not be read, else empty. Such
                    a row leaves the other fields empty (null and [] in JSON).
Params  none, because this is a command-line tool and not a DVC stage.

Files are decoded like the ingest stage decodes them (content decides the format, EXIF
orientation applied, every colour mode converted to RGB). Every file inside a folder is
tried, so a file that is not an image appears as a row with an error instead of
disappearing. Rows are sorted by path. Messages go to stderr, never into the output.

Never imports torch or ultralytics, so it runs where only the exported model is deployed.
Besides onnxruntime, numpy and Pillow, the modisch modules it uses import imagehash and
tqdm.

Run:  python stages/predict.py photos/ shirt.jpg 'shop/**/*.png' --format json --output predictions.json
"""

import argparse
import csv
import glob
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

from modisch.images import ImageRejected, load_image_file
from modisch.onnx_model import OnnxClassifier
from modisch.progress import progress

log = logging.getLogger("predict")

FIELDS = ["file", "label", "confidence", "top_k", "uncertain", "error"]

# Decimal places of the probabilities written. The CSV top_k string uses fewer to stay short.
CONFIDENCE_DECIMALS = 6
CSV_TOP_K_DECIMALS = 4

GLOB_CHARACTERS = frozenset("*?[")


def find_files(inputs: list[str]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of files.

    A file reached through two inputs is listed once. Raises SystemExit naming the first
    input that matches no file.
    """
    found: dict[Path, Path] = {}
    for text in inputs:
        matches = _expand(text)
        if not matches:
            raise SystemExit(_no_match_message(text))
        for path in matches:
            found.setdefault(path.resolve(), path)
    return sorted(found.values(), key=lambda path: str(path))


def _expand(text: str) -> list[Path]:
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _files_under(path)
    if not GLOB_CHARACTERS & set(text):
        return []

    files = []
    for match in glob.glob(text, recursive=True):
        match_path = Path(match)
        if match_path.is_file():
            files.append(match_path)
        elif match_path.is_dir():
            files.extend(_files_under(match_path))
    return files


def _files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def _no_match_message(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        return f"{text}: folder contains no files. Pass a folder with images."
    if GLOB_CHARACTERS & set(text):
        return f"{text}: glob pattern matches no files. Check the pattern and quote it for the shell."
    return f"{text}: file or folder not found. Check the path."


def load_classifier(path: Path) -> OnnxClassifier:
    """Open the ONNX model, with an error that names the path and the fix."""
    if not path.is_file():
        raise SystemExit(f"{path}: model not found. Build it with `dvc repro export` "
                         f"or pass another ONNX file with --model.")
    try:
        return OnnxClassifier(path)
    except (InvalidProtobuf, InvalidGraph, Fail) as error:
        raise SystemExit(f"{path}: invalid ONNX model ({error}). Export it again with "
                         f"`dvc repro export` or pass another file with --model.") from error


def model_batch_size(classifier: OnnxClassifier, requested: int) -> int:
    """Return ``requested``, or the model's batch size when its batch axis is fixed."""
    batch_axis = classifier.session.get_inputs()[0].shape[0]
    if isinstance(batch_axis, int) and batch_axis != requested:
        log.warning("%s has a fixed batch size of %d, so --batch %d is ignored. "
                    "Export with a dynamic batch axis to choose the batch size.",
                    classifier.path, batch_axis, requested)
        return batch_axis
    return requested


def classify_files(classifier: OnnxClassifier, files: list[Path], batch_size: int, top_k: int,
                   threshold: float | None) -> list[dict]:
    """Return one row per file: the prediction, or the reason the file could not be read."""
    rows: list[dict] = []
    for start in progress(range(0, len(files), batch_size), desc="predict", unit="batch"):
        # Index into rows and decoded image of each readable file in this batch.
        readable: list[tuple[int, Image.Image]] = []
        for path in files[start:start + batch_size]:
            error = None
            try:
                loaded = load_image_file(path)
            except ImageRejected as rejected:
                error = f"{rejected.reason}: {rejected.detail}"
            except OSError as failure:
                error = f"unreadable: {path} cannot be read ({failure.strerror or failure})."

            if error is not None:
                log.warning("%s skipped: %s", path, error)
                rows.append(error_row(path, error))
                continue
            rows.append({"file": str(path)})
            readable.append((len(rows) - 1, loaded.image))

        if not readable:
            continue
        probabilities = classifier.predict([image for _, image in readable])
        for (index, _), row_probabilities in zip(readable, probabilities):
            rows[index].update(prediction_fields(row_probabilities, classifier.classes, top_k,
                                                 threshold))
    return rows


def error_row(path: Path, error: str) -> dict:
    return {"file": str(path), "label": None, "confidence": None, "top_k": [],
            "uncertain": None, "error": error}


def prediction_fields(probabilities: np.ndarray, classes: list[str], top_k: int,
                      threshold: float | None) -> dict:
    """Return label, confidence, top_k and uncertain for one image's probabilities."""
    # A stable sort keeps equal probabilities in class order, so the output is deterministic.
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    ranked = [{"label": classes[i], "probability": round(float(probabilities[i]), CONFIDENCE_DECIMALS)}
              for i in order]
    confidence = float(probabilities[order[0]])
    return {"label": classes[order[0]],
            "confidence": round(confidence, CONFIDENCE_DECIMALS),
            "top_k": ranked,
            "uncertain": threshold is not None and confidence < threshold,
            "error": None}


def format_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def format_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(csv_row(row))
    return buffer.getvalue()


def csv_row(row: dict) -> dict:
    """Flatten a row for CSV: top_k as "label:probability;...", booleans as true/false."""
    top_k = ";".join(f"{entry['label']}:{entry['probability']:.{CSV_TOP_K_DECIMALS}f}"
                     for entry in row["top_k"])
    confidence = "" if row["confidence"] is None else f"{row['confidence']:.{CONFIDENCE_DECIMALS}f}"
    uncertain = "" if row["uncertain"] is None else str(row["uncertain"]).lower()
    return {"file": row["file"], "label": row["label"] or "", "confidence": confidence,
            "top_k": top_k, "uncertain": uncertain, "error": row["error"] or ""}


def write_output(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER_OR_GLOB",
                        help="image files, folders (searched recursively) or glob patterns "
                             "(quote them; ** matches any depth)")
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"),
                        help="exported ONNX model (default: models/model.onnx)")
    parser.add_argument("--format", choices=["csv", "json"], default="csv",
                        help="output format (default: csv)")
    parser.add_argument("--output", type=Path, default=None,
                        help="file to write the predictions to (default: stdout)")
    parser.add_argument("--top-k", type=positive_int, default=3,
                        help="number of most probable classes listed per image, at most the "
                             "number of classes (default: 3)")
    parser.add_argument("--batch", type=positive_int, default=32,
                        help="images per model call (default: 32)")
    parser.add_argument("--threshold", type=probability, default=None,
                        help="confidence below which a prediction is marked uncertain, "
                             "0 to 1 (default: the threshold in the model's metadata)")
    return parser.parse_args(argv)


def describe_threshold(option: float | None, metadata: float | None) -> str:
    if option is not None:
        return f"uncertain below {option} (--threshold)"
    if metadata is not None:
        return f"uncertain below {metadata} (model metadata)"
    return "no threshold in the model metadata, so no prediction is marked uncertain"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    files = find_files(args.inputs)
    classifier = load_classifier(args.model)
    threshold = args.threshold if args.threshold is not None else classifier.threshold
    top_k = min(args.top_k, len(classifier.classes))
    batch_size = model_batch_size(classifier, args.batch)
    log.info("classifying %d files with %s, %s", len(files), args.model,
             describe_threshold(args.threshold, classifier.threshold))

    rows = classify_files(classifier, files, batch_size, top_k, threshold)
    text = format_json(rows) if args.format == "json" else format_csv(rows)
    write_output(text, args.output)

    classified = [row for row in rows if row["error"] is None]
    uncertain = sum(row["uncertain"] for row in classified)
    log.info("%d images classified (%d uncertain), %d files skipped, written to %s",
             len(classified), uncertain, len(rows) - len(classified), args.output or "stdout")


if __name__ == "__main__":
    main()
