"""Classification scores computed from predicted probabilities."""

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_fscore_support, top_k_accuracy_score

THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)


def summarise(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Return top-1, top-5, macro and weighted F1 and per-class figures."""
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    present = support > 0
    return {
        "images": int(len(y_true)),
        "top1": round(float((y_pred == y_true).mean()), 4) if len(y_true) else 0.0,
        "top5": round(float(top_k_accuracy_score(y_true, probs, k=min(5, len(classes)),
                                                 labels=labels)), 4) if len(y_true) else 0.0,
        # Classes without test images would add a meaningless 0 to the average.
        "macro_f1": round(float(f1[present].mean()), 4) if present.any() else 0.0,
        "weighted_f1": round(float(np.average(f1, weights=support)), 4) if support.sum() else 0.0,
        "per_class": {
            name: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                   "f1": round(float(f1[i]), 4), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
    }


def threshold_curve(y_true: np.ndarray, probs: np.ndarray,
                    thresholds: np.ndarray = THRESHOLDS) -> pd.DataFrame:
    """Return coverage and macro-F1 over the kept predictions for each confidence threshold.

    A prediction is kept when its top probability is at least the threshold; macro-F1 is
    taken over the classes that occur among the kept images.
    """
    confidence = probs.max(axis=1)
    y_pred = probs.argmax(axis=1)
    rows = []
    for threshold in thresholds:
        kept = confidence >= threshold
        coverage = float(kept.mean()) if len(kept) else 0.0
        macro_f1 = float(f1_score(y_true[kept], y_pred[kept], average="macro", zero_division=0)) \
            if kept.any() else 0.0
        accuracy = float((y_pred[kept] == y_true[kept]).mean()) if kept.any() else 0.0
        rows.append({"threshold": float(threshold), "coverage": round(coverage, 4),
                     "macro_f1": round(macro_f1, 4), "accuracy": round(accuracy, 4)})
    return pd.DataFrame(rows)


def choose_threshold(curve: pd.DataFrame, min_coverage: float) -> float:
    """Return the threshold with the best macro-F1 among those keeping ``min_coverage``.

    Ties go to the lowest threshold, which keeps the most predictions.
    """
    allowed = curve[curve["coverage"] >= min_coverage]
    if allowed.empty:
        return float(curve["threshold"].min())
    best = allowed["macro_f1"].max()
    return float(allowed[allowed["macro_f1"] == best]["threshold"].min())


def at_threshold(y_true: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """Return coverage and macro-F1 of the predictions kept at ``threshold``."""
    curve = threshold_curve(y_true, probs, np.array([threshold]))
    row = curve.iloc[0]
    return {"coverage": float(row["coverage"]), "macro_f1": float(row["macro_f1"]),
            "accuracy": float(row["accuracy"])}


def calibration_bins(y_true: np.ndarray, probs: np.ndarray, bins: int) -> pd.DataFrame:
    """Return per confidence bin: mean confidence, accuracy and image count."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i contains confidences in (edge_i, edge_i+1]; confidence 0 goes to the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        members = which == i
        rows.append({
            "bin_low": round(float(edges[i]), 4), "bin_high": round(float(edges[i + 1]), 4),
            "confidence": round(float(confidence[members].mean()), 4) if members.any() else None,
            "accuracy": round(float(correct[members].mean()), 4) if members.any() else None,
            "images": int(members.sum()),
        })
    return pd.DataFrame(rows)


def expected_calibration_error(bins: pd.DataFrame) -> float:
    """Return the image-weighted mean gap between confidence and accuracy over the bins."""
    used = bins[bins["images"] > 0]
    if used.empty:
        return 0.0
    gaps = (used["confidence"].astype(float) - used["accuracy"].astype(float)).abs()
    return round(float(np.average(gaps, weights=used["images"])), 4)
