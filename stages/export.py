"""Export the trained model to ONNX, check it against PyTorch, and set its threshold.

Reads   models/best.pt (an ultralytics YOLO-cls or an EfficientNet-Lite0 checkpoint,
        recognised by its content), data/dataset/{val,test}/ and data/dataset/index.csv
Writes  models/model.onnx       dynamic batch axis; metadata: class names in output order,
                                input size, preprocessing, output kind, confidence
                                threshold, params hash
        metrics/export.json     parity (max probability difference, top-1 agreement on the
                                test images) and the threshold chosen on val
Params  classes, train.imgsz, export.*, evaluate.threshold.*

Both families export with a softmax output, so the ONNX model returns probabilities. An
EfficientNet-Lite0 checkpoint carries its own image size and preprocessing (mean and std
0.5), which go into the metadata in place of train.imgsz and the YOLO preprocessing.

The confidence threshold is chosen here, on val, so that the evaluate stage can report it
on test without ever tuning on test.

Run alone:  python stages/export.py
"""

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from modisch import efficientnet
from modisch.onnx_model import OnnxClassifier, write_metadata
from modisch.outputs import write_json
from modisch.params import load_params
from modisch.preprocess import preprocess, yolo_preprocessing
from modisch.scores import at_threshold, choose_threshold, threshold_curve
from modisch.splits import predict_files, read_split
from modisch.yolo import offline_ultralytics

log = logging.getLogger("export")

BATCH = 32


# The params keys that shape the exported model; dvc.yaml lists the same ones for export.
MODEL_PARAMS = ("classes", "sources", "ingest", "split", "balance", "train", "export")


def params_hash(params: dict) -> str:
    """Return a short hash of the params that shaped the model, to tie the file to its run."""
    shaping = {key: params.get(key) for key in MODEL_PARAMS}
    shaping["evaluate.threshold"] = params.get("evaluate", {}).get("threshold")
    canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def export_onnx(weights: Path, imgsz: int, opset: int, simplify: bool, out: Path) -> list[str]:
    """Export ``weights`` to ``out``; return the class names in output order."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="classify")
    with tempfile.TemporaryDirectory(prefix="modisch-export-") as tmp:
        copy = Path(tmp) / weights.name
        shutil.copyfile(weights, copy)
        exported = YOLO(str(copy), task="classify").export(
            format="onnx", imgsz=imgsz, dynamic=True, simplify=simplify, opset=opset)
        shutil.copyfile(exported, out)
    return [model.names[i] for i in sorted(model.names)]


def torch_predictor(weights: Path, imgsz: int):
    """Return a function that maps PIL images to the PyTorch model's probabilities."""
    import torch
    from ultralytics import YOLO

    model = YOLO(str(weights), task="classify").model.float().eval()
    spec = yolo_preprocessing(imgsz)

    def predict(images):
        batch = torch.from_numpy(np.stack([preprocess(image, spec) for image in images]))
        with torch.inference_mode():
            output = model(batch)
        output = output[0] if isinstance(output, (tuple, list)) else output
        return output.numpy()

    return predict


def efficientnet_predictor(content: dict):
    """Return a function that maps PIL images to an EfficientNet checkpoint's probabilities."""
    import torch

    model = efficientnet.WithSoftmax(efficientnet.model_from_checkpoint(content)).eval()
    spec = content["preprocessing"]

    def predict(images):
        batch = torch.from_numpy(np.stack([preprocess(image, spec) for image in images]))
        with torch.inference_mode():
            return model(batch).numpy()

    return predict


def check_parity(onnx_probs: np.ndarray, torch_probs: np.ndarray, max_abs_diff: float,
                 min_agreement: float) -> dict:
    """Compare ONNX and PyTorch probabilities; stop when they disagree beyond the limits."""
    difference = float(np.abs(onnx_probs - torch_probs).max()) if len(onnx_probs) else 0.0
    agreement = float((onnx_probs.argmax(1) == torch_probs.argmax(1)).mean()) if len(onnx_probs) else 1.0
    parity = {"images": int(len(onnx_probs)), "max_abs_diff": difference,
              "top1_agreement": round(agreement, 4),
              "max_abs_diff_limit": max_abs_diff, "min_top1_agreement": min_agreement}
    if difference > max_abs_diff or agreement < min_agreement:
        raise SystemExit(
            f"ONNX export disagrees with PyTorch on the test images: max probability difference "
            f"{difference:.2e} (limit {max_abs_diff}), top-1 agreement {agreement:.4f} (minimum "
            f"{min_agreement}). Try another export.opset or export.simplify: false.")
    return parity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--weights", type=Path, default=Path("models/best.pt"))
    parser.add_argument("--dataset", type=Path, default=Path("data/dataset"))
    parser.add_argument("--out", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/export.json"))
    parser.add_argument("--config-dir", type=Path, default=Path(".ultralytics"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = load_params(args.params)
    imgsz = int(params["train"]["imgsz"])
    settings = params["export"]
    threshold_settings = params["evaluate"]["threshold"]
    if threshold_settings["criterion"] != "macro_f1":
        raise SystemExit(f"params.yaml: evaluate.threshold.criterion is "
                         f"{threshold_settings['criterion']!r}; only 'macro_f1' is supported.")
    if not args.weights.is_file():
        raise SystemExit(f"{args.weights}: not found; run the train stage first (dvc repro train).")
    content = efficientnet.read_checkpoint(args.weights)

    partial = args.out.with_name(args.out.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        offline_ultralytics(args.config_dir, None)
        log.info("exporting %s at %d px", args.weights, imgsz)
        names = export_onnx(args.weights, imgsz, int(settings["opset"]),
                            bool(settings["simplify"]), partial)
        spec = yolo_preprocessing(imgsz)
        torch_predict = torch_predictor(args.weights, imgsz)
    else:
        imgsz, names, spec = int(content["image_size"]), list(content["classes"]), \
            content["preprocessing"]
        log.info("exporting %s (%s) at %d px", args.weights, content["architecture"], imgsz)
        efficientnet.export_onnx(efficientnet.model_from_checkpoint(content), imgsz,
                                 int(settings["opset"]), bool(settings["simplify"]), partial)
        torch_predict = efficientnet_predictor(content)
    if sorted(names) != sorted(params["classes"]):
        raise SystemExit(f"{args.weights}: model classes {names} differ from params.yaml classes.")
    write_metadata(partial, {"classes": names, "image_size": imgsz, "preprocessing": spec,
                             "output": "probabilities", "params_hash": params_hash(params),
                             "model": str(params["train"]["model"])})
    classifier = OnnxClassifier(partial)

    test = read_split(args.dataset, "test", names)
    onnx_test = predict_files(classifier.predict, list(test["file"]), BATCH, "onnx test")
    torch_test = predict_files(torch_predict, list(test["file"]), BATCH, "pytorch test")
    parity = check_parity(onnx_test, torch_test, float(settings["parity"]["max_abs_diff"]),
                          float(settings["parity"]["min_top1_agreement"]))

    val = read_split(args.dataset, "val", names)
    val_probs = predict_files(classifier.predict, list(val["file"]), BATCH, "onnx val")
    curve = threshold_curve(val["label"].to_numpy(), val_probs)
    threshold = choose_threshold(curve, float(threshold_settings["min_coverage"]))
    at_val = at_threshold(val["label"].to_numpy(), val_probs, threshold)
    write_metadata(partial, {"threshold": threshold})
    partial.replace(args.out)

    write_json(args.metrics, {
        "parity": parity,
        "threshold": threshold,
        "threshold_criterion": threshold_settings["criterion"],
        "val_coverage_at_threshold": at_val["coverage"],
        "val_macro_f1_at_threshold": at_val["macro_f1"],
        "onnx_bytes": args.out.stat().st_size,
    })
    log.info("%s written: parity max diff %.2e, top-1 agreement %.4f; threshold %.2f keeps "
             "%.1f%% of val", args.out, parity["max_abs_diff"], parity["top1_agreement"],
             threshold, 100 * at_val["coverage"])


if __name__ == "__main__":
    main()
