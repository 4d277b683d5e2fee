"""Evaluate the exported ONNX model on val and test, the file that ships.

Reads   models/model.onnx (classes, preprocessing and threshold from its metadata),
        data/dataset/{val,test}/ and data/dataset/index.csv
Writes  metrics/eval.json            test top-1, top-5, macro and weighted F1, per class,
                                     per source, threshold with its coverage and macro-F1,
                                     ECE, most frequent confusions, and val figures
        plots/eval/predictions_test.csv   one row per test image (confusion matrix data)
        plots/eval/threshold_{val,test}.csv   macro-F1, accuracy, coverage per threshold
        plots/eval/per_class_test.csv, plots/eval/reliability_test.csv
        plots/eval/*.png             confusion matrices, threshold curve, per-class F1,
                                     reliability diagram, most confident mistakes
Params  evaluate.ece_bins, evaluate.gallery_size

The threshold was chosen on val by the export stage; here it is only reported.

Run alone:  python stages/evaluate.py
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from modisch import figures
from modisch.onnx_model import OnnxClassifier
from modisch.outputs import write_csv, write_json
from modisch.params import load_params
from modisch.scores import (
    at_threshold,
    calibration_bins,
    expected_calibration_error,
    summarise,
    threshold_curve,
)
from modisch.splits import predict_files, read_split

log = logging.getLogger("evaluate")

BATCH = 32


def predictions_table(rows: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Return one row per image: file, source, true and predicted class, confidence."""
    predicted = probs.argmax(axis=1)
    return pd.DataFrame({
        "file": rows["file"], "source": rows["source"], "path": rows["path"],
        "actual": rows["class"], "predicted": [classes[i] for i in predicted],
        "confidence": np.round(probs.max(axis=1), 4),
    })


def frequent_confusions(predictions: pd.DataFrame, limit: int = 10) -> list[dict]:
    """Return the most frequent (true, predicted) pairs among the mistakes."""
    mistakes = predictions[predictions["actual"] != predictions["predicted"]]
    pairs = mistakes.groupby(["actual", "predicted"]).size().sort_values(ascending=False)
    return [{"true": true, "predicted": pred, "count": int(n)}
            for (true, pred), n in pairs.head(limit).items()]


def evaluate_split(rows: pd.DataFrame, probs: np.ndarray, classes: list[str], threshold: float,
                   ece_bins: int) -> dict:
    """Return the summary figures of one split, with threshold and calibration figures."""
    labels = rows["label"].to_numpy()
    summary = summarise(labels, probs, classes)
    kept = at_threshold(labels, probs, threshold)
    summary.update(
        threshold=threshold,
        coverage_at_threshold=kept["coverage"],
        macro_f1_at_threshold=kept["macro_f1"],
        accuracy_at_threshold=kept["accuracy"],
        ece=expected_calibration_error(calibration_bins(labels, probs, ece_bins)),
    )
    return summary


def per_source(rows: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> dict:
    """Return top-1 and macro-F1 per source dataset, to expose a model that learned the source."""
    result = {}
    for source in sorted(rows["source"].unique()):
        mask = (rows["source"] == source).to_numpy()
        summary = summarise(rows["label"].to_numpy()[mask], probs[mask], classes)
        result[source] = {key: summary[key] for key in ("images", "top1", "top5", "macro_f1")}
    return result


def write_plots(plots: Path, predictions: pd.DataFrame, probs: np.ndarray, labels: np.ndarray,
                classes: list[str], test: dict, val_curve: pd.DataFrame, ece_bins: int,
                gallery_size: int) -> None:
    """Write the plot data for dvc plots and the PNG figures."""
    write_csv(plots / "predictions_test.csv", predictions.drop(columns=["file"]))
    write_csv(plots / "threshold_val.csv", val_curve)
    test_curve = threshold_curve(labels, probs)
    write_csv(plots / "threshold_test.csv", test_curve)
    per_class = pd.DataFrame([{"class": name, **scores} for name, scores in test["per_class"].items()])
    write_csv(plots / "per_class_test.csv", per_class)
    bins = calibration_bins(labels, probs, ece_bins)
    write_csv(plots / "reliability_test.csv", bins)

    matrix = confusion_matrix(labels, probs.argmax(axis=1), labels=range(len(classes)))
    figures.confusion_matrix_png(matrix, classes, "Test confusion matrix (counts)",
                                 plots / "confusion_test.png", normalised=False)
    figures.confusion_matrix_png(matrix, classes, "Test confusion matrix (share of true class)",
                                 plots / "confusion_test_normalised.png", normalised=True)
    figures.threshold_png(test_curve, test["threshold"],
                          "Test: kept predictions against confidence threshold",
                          plots / "threshold_test.png")
    figures.per_class_f1_png(test["per_class"], "Test F1 per class", plots / "per_class_f1_test.png")
    figures.reliability_png(bins, test["ece"], "Test reliability", plots / "reliability_test.png")

    mistakes = predictions[predictions["actual"] != predictions["predicted"]]
    mistakes = mistakes.sort_values(["confidence", "file"], ascending=[False, True]).head(gallery_size)
    figures.mistakes_png(mistakes.rename(columns={"actual": "class"}), plots / "mistakes_test.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--dataset", type=Path, default=Path("data/dataset"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--plots", type=Path, default=Path("plots/eval"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    settings = load_params(args.params)["evaluate"]
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: not found; run the export stage first (dvc repro export).")
    classifier = OnnxClassifier(args.model)
    classes = classifier.classes
    threshold = classifier.threshold if classifier.threshold is not None else 0.0
    ece_bins = int(settings["ece_bins"])

    val = read_split(args.dataset, "val", classes)
    test = read_split(args.dataset, "test", classes)
    log.info("evaluating %s on %d val and %d test image(s)", args.model, len(val), len(test))
    val_probs = predict_files(classifier.predict, list(val["file"]), BATCH, "val")
    test_probs = predict_files(classifier.predict, list(test["file"]), BATCH, "test")

    test_figures = evaluate_split(test, test_probs, classes, threshold, ece_bins)
    val_figures = evaluate_split(val, val_probs, classes, threshold, ece_bins)
    predictions = predictions_table(test, test_probs, classes)
    report = {
        **test_figures,
        "per_source": per_source(test, test_probs, classes),
        "confusions": frequent_confusions(predictions),
        "val": {key: value for key, value in val_figures.items() if key != "per_class"},
    }
    write_json(args.metrics, report)
    val_curve = threshold_curve(val["label"].to_numpy(), val_probs)
    write_plots(args.plots, predictions, test_probs, test["label"].to_numpy(), classes,
                test_figures, val_curve, ece_bins, int(settings["gallery_size"]))
    log.info("test: top-1 %.4f, macro-F1 %.4f; threshold %.2f keeps %.1f%% at macro-F1 %.4f; "
             "ECE %.4f", report["top1"], report["macro_f1"], threshold,
             100 * report["coverage_at_threshold"], report["macro_f1_at_threshold"], report["ece"])


if __name__ == "__main__":
    main()
