"""Set up ultralytics for offline, reproducible use, and check named weights files.

Call :func:`offline_ultralytics` before the first ``import ultralytics`` of a process.
"""

import os
from pathlib import Path

WEIGHTS_SUFFIXES = (".pt", ".pth")


def offline_ultralytics(config_dir: Path, threads: int | None) -> None:
    """Keep ultralytics off the network and its settings inside ``config_dir``.

    ultralytics checks connectivity on import, sends usage events, downloads the Arial font
    for plots and logs to DVCLive when that is installed. The pipeline wants none of that:
    plots are drawn by the evaluate stage, and DVC tracks the outputs itself.
    """
    config_dir = Path(config_dir).resolve()
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"

    from ultralytics.utils import SETTINGS, torch_utils

    SETTINGS.update({"sync": False, "dvc": False, "clearml": False, "comet": False,
                     "mlflow": False, "raytune": False, "tensorboard": False, "wandb": False})
    # ultralytics trains on cpu_count() - 1 threads, which leaves one of two cores idle.
    torch_utils.NUM_THREADS = threads or os.cpu_count() or 1


def check_weights(model: str) -> None:
    """Stop with the two fixes when a named weights file is not on disk.

    ultralytics would try to download a missing ``yolov8n-cls.pt`` from GitHub, which
    fails slowly without internet. Model definitions (``*.yaml``) need no file.
    """
    if not model.endswith(WEIGHTS_SUFFIXES) or Path(model).is_file():
        return
    raise SystemExit(
        f"train.model: weights file {model!r} not found, and this pipeline does not download "
        f"weights. Either place {Path(model).name} at {Path(model).resolve()} (it is published "
        f"in the ultralytics/assets GitHub releases), or set train.model to "
        f"{Path(model).stem}.yaml in params.yaml to train from scratch "
        f"(e.g. dvc exp run -S train.model={Path(model).stem}.yaml)."
    )
