"""Train EfficientNet-Lite0 on a CPU in three steps: cache, train the head, fine-tune the tail.

1. Cache: the frozen trunk (stem and every stage before the last ``finetune_stages``) runs
   once over each training image and its horizontal mirror, and once over each val image.
   Its output activations stay in memory as float16.
2. Head: the ImageNet tail turns the cached activations into pooled features once, and a
   new linear classifier is trained on them for ``head.epochs`` epochs.
3. Fine-tune: the tail (last stages, ``conv_head``, its BatchNorm and the classifier) trains
   on the cached activations from the best head, with early stopping on val.
   The trunk never runs again, which is what makes several epochs affordable on a CPU.

Every input passes through ``modisch.preprocess.preprocess`` with the spec written into
the ONNX metadata, so training, export and evaluation see identical pixels. BatchNorm
layers keep their ImageNet running statistics (eval mode), and their scale and shift still
train. Frozen statistics suit small batches and keep several processes equivalent to one.

Run under ``torchrun`` (gloo backend), each process caches a share of the images and
gathers the rest. Every step's batch is split across the processes, and their gradients
combine into the mean over the whole batch, so N processes follow the one-process run up to
float rounding and dropout masks.
"""

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from modisch import efficientnet
from modisch.outputs import read_csv
from modisch.preprocess import preprocess
from modisch.progress import progress

log = logging.getLogger("train")

SAMPLING = ("balanced", "files")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
CACHE_BATCH = 16


@dataclass
class Recipe:
    """The ``train.efficientnet`` settings of params.yaml, checked."""

    sampling: str
    balance_power: float
    flip: bool
    finetune_stages: int
    batch: int
    label_smoothing: float
    dropout: float
    optimizer: str
    schedule: str
    warmup_epochs: float
    head_epochs: int
    head_lr: float
    head_weight_decay: float
    finetune_epochs: int
    finetune_lr: float
    finetune_weight_decay: float
    patience: int

    @classmethod
    def from_params(cls, settings: dict) -> "Recipe":
        head, finetune = settings["head"], settings["finetune"]
        recipe = cls(
            sampling=str(settings["sampling"]),
            balance_power=float(settings["balance_power"]), flip=bool(settings["flip"]),
            finetune_stages=int(settings["finetune_stages"]), batch=int(settings["batch"]),
            label_smoothing=float(settings["label_smoothing"]),
            dropout=float(settings["dropout"]), optimizer=str(settings["optimizer"]),
            schedule=str(settings["schedule"]), warmup_epochs=float(settings["warmup_epochs"]),
            head_epochs=int(head["epochs"]), head_lr=float(head["lr"]),
            head_weight_decay=float(head["weight_decay"]),
            finetune_epochs=int(finetune["epochs"]), finetune_lr=float(finetune["lr"]),
            finetune_weight_decay=float(finetune["weight_decay"]),
            patience=int(settings["patience"]))
        for key, value, allowed in (("sampling", recipe.sampling, SAMPLING),
                                    ("optimizer", recipe.optimizer, OPTIMIZERS),
                                    ("schedule", recipe.schedule, SCHEDULES)):
            if value not in allowed:
                raise SystemExit(f"params.yaml: train.efficientnet.{key} is {value!r}; expected "
                                 f"one of {', '.join(allowed)}.")
        if recipe.batch < 1 or recipe.head_epochs < 0 or recipe.finetune_epochs < 0:
            raise SystemExit("params.yaml: train.efficientnet batch must be at least 1, and "
                             "head.epochs and finetune.epochs at least 0.")
        if not 0.0 <= recipe.balance_power <= 1.0:
            raise SystemExit(f"params.yaml: train.efficientnet.balance_power is "
                             f"{recipe.balance_power}; expected 0 to 1.")
        if recipe.head_epochs + recipe.finetune_epochs == 0:
            raise SystemExit("params.yaml: train.efficientnet head.epochs and finetune.epochs "
                             "are both 0; set at least one above 0.")
        efficientnet.first_trainable_stage(recipe.finetune_stages)
        return recipe


@dataclass
class Result:
    """A finished run: the model with its best weights, the history and the timings."""

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    head_epochs_run: int
    finetune_epochs_run: int
    train_images: int
    seconds: dict = field(default_factory=dict)
    images_trained: int = 0


# ----------------------------------------------------------------------------- processes

@dataclass
class Processes:
    """This process's place among the ``torchrun`` processes (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> np.ndarray:
        """Return this process's indices of ``count`` items, every ``world_size``-th one."""
        return np.arange(self.rank, count, self.world_size)

    def gather(self, local: torch.Tensor, count: int) -> torch.Tensor:
        """Reassemble the rows that each process computed for its :meth:`shard` of ``count``."""
        if self.world_size == 1:
            return local
        rows = math.ceil(count / self.world_size)
        padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype)
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        # Row j of process r is item j * world_size + r.
        full = torch.stack(parts, dim=1).reshape(rows * self.world_size, *local.shape[1:])
        return full[:count]


def start_processes(threads: int | None) -> Processes:
    """Join the ``torchrun`` process group when started by it, and set torch's threads."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cores = threads or os.cpu_count() or 1
    if world_size > 1:
        dist.init_process_group(backend="gloo")
        processes = Processes(dist.get_rank(), dist.get_world_size())
    else:
        processes = Processes()
    torch.set_num_threads(max(1, cores // processes.world_size))
    return processes


def stop_processes(processes: Processes) -> None:
    if processes.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- data

def train_rows(dataset: Path, classes: list[str], sampling: str) -> pd.DataFrame:
    """Return the training files of ``index.csv`` with their ``label``.

    ``balanced`` keeps the original photos only (``augmented_from`` empty), and ``files``
    keeps every file of the train split, the balance stage's oversampled copies included.
    """
    index = read_csv(dataset / "index.csv")
    rows = index[index["split"] == "train"]
    if sampling == "balanced":
        rows = rows[rows["augmented_from"] == ""]
    return labelled(rows, dataset, classes)


def val_rows(dataset: Path, classes: list[str]) -> pd.DataFrame:
    index = read_csv(dataset / "index.csv")
    return labelled(index[(index["split"] == "val") & (index["augmented_from"] == "")],
                    dataset, classes)


def labelled(rows: pd.DataFrame, dataset: Path, classes: list[str]) -> pd.DataFrame:
    unknown = sorted(set(rows["class"]) - set(classes))
    if unknown:
        raise SystemExit(f"{dataset / 'index.csv'}: classes {unknown} are not in params.yaml "
                         f"classes; re-run the balance stage.")
    rows = rows.sort_values("file").reset_index(drop=True)
    return pd.DataFrame({"file": [str(dataset / name) for name in rows["file"]],
                         "label": rows["class"].map(classes.index).astype(int)})


class Images(torch.utils.data.Dataset):
    """Image files turned into model input by a preprocessing spec."""

    def __init__(self, files: list[str], spec: dict) -> None:
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            return torch.from_numpy(preprocess(image, self.spec))


@torch.no_grad()
def cache_activations(trunk: nn.Module, files: list[str], spec: dict, flip: bool, workers: int,
                      processes: Processes, desc: str) -> list[torch.Tensor]:
    """Return the trunk's float16 output for every file, and for its mirror when ``flip``."""
    shard = processes.shard(len(files))
    loader = torch.utils.data.DataLoader(Images([files[i] for i in shard], spec),
                                         batch_size=CACHE_BATCH, num_workers=workers)
    views: list[list[torch.Tensor]] = [[] for _ in range(2 if flip else 1)]
    for batch in progress(loader, desc=desc, unit="batch", disable=not processes.main):
        batch = batch.contiguous(memory_format=torch.channels_last)
        views[0].append(trunk(batch).half())
        if flip:
            views[1].append(trunk(batch.flip(-1)).half())
    return [processes.gather(torch.cat(parts) if parts else empty_like_output(trunk, spec),
                             len(files)).contiguous() for parts in views]


def empty_like_output(trunk: nn.Module, spec: dict) -> torch.Tensor:
    """Return zero rows shaped like the trunk output, for a process with an empty shard."""
    with torch.no_grad():
        size = int(spec["size"])
        return trunk(torch.zeros(1, 3, size, size))[:0].half()


@torch.no_grad()
def pooled_features(tail: efficientnet.Tail, activations: torch.Tensor,
                    processes: Processes) -> torch.Tensor:
    """Return the tail's pooled features of cached activations, computed in shares."""
    shard = processes.shard(len(activations))
    parts = [tail.features(activations[shard[i:i + CACHE_BATCH]].float())
             for i in range(0, len(shard), CACHE_BATCH)]
    local = torch.cat(parts) if parts else torch.zeros(0, tail.classifier.in_features)
    return processes.gather(local, len(activations))


# ----------------------------------------------------------------------------- sampling

def epoch_order(labels: np.ndarray, recipe: Recipe, seed: int, phase: int,
                epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the sample indices and mirror flags of one epoch, equal in every process.

    ``balanced`` draws as many samples as there are images, with replacement, a class with
    n images drawn in proportion to n ** (1 - balance_power): equally often at power 1, as
    in the data at power 0. ``files`` shuffles every image once.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + epoch)
    if recipe.sampling == "balanced":
        counts = np.bincount(labels).astype(np.float64)
        weights = torch.from_numpy(counts[labels] ** -recipe.balance_power)
        order = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    else:
        order = torch.randperm(len(labels), generator=generator)
    mirrored = torch.rand(len(order), generator=generator) < 0.5 if recipe.flip \
        else torch.zeros(len(order), dtype=torch.bool)
    return order, mirrored


def batches(count: int, batch: int, world_size: int) -> list[slice]:
    """Return the full batches of one epoch, dropping the shuffled remainder.

    The batch is reduced to fit tiny data, and kept a multiple of ``world_size`` so every
    process gets an equal share of each step.
    """
    batch = min(batch, count)
    batch -= batch % world_size
    if batch == 0:
        raise SystemExit(f"{count} training sample(s) cannot be split across {world_size} "
                         f"processes; use fewer processes.")
    return [slice(start, start + batch) for start in range(0, count - batch + 1, batch)]


# ----------------------------------------------------------------------------- optimisation

def make_optimizer(parameters, recipe: Recipe, lr: float, weight_decay: float):
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True,
                           weight_decay=weight_decay)


def make_schedule(optimizer, recipe: Recipe, steps_per_epoch: int, epochs: int):
    """Return a per-step schedule: linear warmup, then cosine to 0 or constant."""
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    total = max(1, steps_per_epoch * epochs)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "constant":
            return 1.0
        progress_ratio = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_ratio)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_train_mode(module: nn.Module) -> None:
    """Put dropout in train mode and keep every BatchNorm layer in eval mode."""
    module.train()
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def train_epoch(step_model: nn.Module, inputs: list[torch.Tensor], labels: torch.Tensor,
                order: torch.Tensor, mirrored: torch.Tensor, recipe: Recipe, optimizer,
                schedule, processes: Processes, desc: str) -> float:
    """Run one epoch of optimiser steps and return the mean training loss of all processes."""
    loss_sum = torch.zeros(2, dtype=torch.float64)
    steps = batches(len(order), recipe.batch, processes.world_size)
    for step in progress(steps, desc=desc, unit="step", disable=not processes.main):
        chosen, flipped = order[step], mirrored[step]
        local = slice(processes.rank, None, processes.world_size)
        chosen, flipped = chosen[local], flipped[local]
        x = torch.where(_expand(flipped, inputs[0]), inputs[-1][chosen], inputs[0][chosen]).float()
        logits = step_model(x)
        loss = F.cross_entropy(logits, labels[chosen], label_smoothing=recipe.label_smoothing,
                               reduction="sum")
        # DDP averages gradients over processes, so each local sum is scaled to make the
        # result the mean over the whole batch.
        step_size = step.stop - step.start
        optimizer.zero_grad(set_to_none=True)
        (loss * processes.world_size / step_size).backward()
        optimizer.step()
        schedule.step()
        loss_sum += torch.tensor([loss.item(), len(chosen)], dtype=torch.float64)
    if processes.world_size > 1:
        dist.all_reduce(loss_sum)
    return float(loss_sum[0] / max(1.0, float(loss_sum[1])))


def _expand(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def validate(predict, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
             processes: Processes) -> dict:
    """Return val loss (cross-entropy without smoothing), top-1 and top-5 over all processes."""
    shard = processes.shard(len(inputs))
    parts = [predict(inputs[shard[i:i + 64]].float()) for i in range(0, len(shard), 64)]
    local = torch.cat(parts) if parts else torch.zeros(0, num_classes)
    logits = processes.gather(local, len(inputs))
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"val_loss": float(F.cross_entropy(logits, labels)),
            "val_top1": float((top5[:, 0] == labels).float().mean()),
            "val_top5": float((top5 == labels[:, None]).any(1).float().mean())}


# ----------------------------------------------------------------------------- recipe

class Tracker:
    """Per-epoch history, the best weights by val top-1 (lower val loss breaks ties)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows: list[dict] = []
        self.best_key: tuple[float, float] | None = None
        self.best_epoch = 0
        self.best_state: dict | None = None

    def record(self, train_loss: float, metrics: dict, phase: str) -> bool:
        """Add one epoch, keeping its weights and returning True when it is the best so far."""
        epoch = len(self.rows) + 1
        self.rows.append({"epoch": epoch, "train_loss": round(train_loss, 5),
                          "val_loss": round(metrics["val_loss"], 5),
                          "val_top1": round(metrics["val_top1"], 5),
                          "val_top5": round(metrics["val_top5"], 5)})
        log.info("%s epoch %d: train loss %.4f, val loss %.4f, val top-1 %.4f, top-5 %.4f",
                 phase, epoch, train_loss, metrics["val_loss"], metrics["val_top1"],
                 metrics["val_top5"])
        key = (metrics["val_top1"], -metrics["val_loss"])
        if self.best_key is not None and key <= self.best_key:
            return False
        self.best_key, self.best_epoch = key, epoch
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return True


def train_head(tail: efficientnet.Tail, features: list[torch.Tensor], labels: torch.Tensor,
               val_features: torch.Tensor, val_labels: torch.Tensor, recipe: Recipe, seed: int,
               tracker: Tracker, processes: Processes) -> int:
    """Train the classifier on cached pooled features, identically in every process."""
    head = nn.Sequential(nn.Dropout(recipe.dropout), tail.classifier)
    optimizer = make_optimizer(tail.classifier.parameters(), recipe, recipe.head_lr,
                               recipe.head_weight_decay)
    steps = len(batches(len(labels), recipe.batch, 1))
    schedule = make_schedule(optimizer, recipe, steps, recipe.head_epochs)
    alone = Processes()
    torch.manual_seed(seed)
    for epoch in range(recipe.head_epochs):
        order, mirrored = epoch_order(labels.numpy(), recipe, seed, 1, epoch)
        head.train()
        loss = train_epoch(head, features, labels, order, mirrored, recipe, optimizer, schedule,
                           alone, f"head {epoch + 1}/{recipe.head_epochs}")
        head.eval()
        metrics = validate(tail.classifier, val_features, val_labels,
                           tail.classifier.out_features, alone)
        tracker.record(loss, metrics, "head")
    if processes.world_size > 1:
        # Thread counts may differ between processes, so rank 0's head replaces the others.
        for tensor in tail.classifier.parameters():
            dist.broadcast(tensor.data, src=0)
    return recipe.head_epochs


def finetune(tail: efficientnet.Tail, activations: list[torch.Tensor], labels: torch.Tensor,
             val_activations: torch.Tensor, val_labels: torch.Tensor, recipe: Recipe, seed: int,
             tracker: Tracker, processes: Processes) -> int:
    """Train the whole tail on cached activations with early stopping and return the epochs run."""
    for parameter in tail.parameters():
        parameter.requires_grad_(True)
    step_model: nn.Module = tail
    if processes.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(tail, broadcast_buffers=False)
    optimizer = make_optimizer([p for p in tail.parameters() if p.requires_grad], recipe,
                               recipe.finetune_lr, recipe.finetune_weight_decay)
    steps = len(batches(len(labels), recipe.batch, processes.world_size))
    schedule = make_schedule(optimizer, recipe, steps, recipe.finetune_epochs)
    torch.manual_seed(seed + processes.rank)
    stale = 0
    for epoch in range(recipe.finetune_epochs):
        order, mirrored = epoch_order(labels.numpy(), recipe, seed, 2, epoch)
        set_train_mode(tail)
        loss = train_epoch(step_model, activations, labels, order, mirrored, recipe, optimizer,
                           schedule, processes, f"fine-tune {epoch + 1}/{recipe.finetune_epochs}")
        tail.eval()
        metrics = validate(tail, val_activations, val_labels, tail.classifier.out_features,
                           processes)
        improved = tracker.record(loss, metrics, "fine-tune")
        stale = 0 if improved else stale + 1
        if stale >= recipe.patience:
            log.info("no better val epoch for %d epoch(s); stopping early", stale)
            return epoch + 1
    return recipe.finetune_epochs


def train(dataset: Path, classes: list[str], image_size: int, recipe: Recipe, seed: int,
          workers: int, processes: Processes) -> Result:
    """Run the recipe on ``dataset`` and return the model with its best val epoch's weights."""
    torch.manual_seed(seed)
    spec = efficientnet.preprocessing(image_size)
    train_set = train_rows(dataset, classes, recipe.sampling)
    val_set = val_rows(dataset, classes)
    if train_set.empty or val_set.empty:
        raise SystemExit(f"{dataset / 'index.csv'}: {len(train_set)} train and {len(val_set)} "
                         f"val image(s); both splits need images. Re-run the split stage.")
    labels = torch.tensor(train_set["label"].to_numpy())
    val_labels = torch.tensor(val_set["label"].to_numpy())
    log.info("efficientnet_lite0: %d train image(s) (%s sampling%s), %d val, %d px, "
             "fine-tuning the last %d stage(s), %d process(es)", len(train_set), recipe.sampling,
             ", mirrored copies" if recipe.flip else "", len(val_set), image_size,
             recipe.finetune_stages, processes.world_size)

    model = efficientnet.build_model(len(classes)).eval()
    model = model.to(memory_format=torch.channels_last)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    first_stage = efficientnet.first_trainable_stage(recipe.finetune_stages)
    trunk = efficientnet.Trunk(model, first_stage).eval()
    tail = efficientnet.Tail(model, first_stage, recipe.dropout).eval()
    seconds = {}

    started = time.perf_counter()
    activations = cache_activations(trunk, list(train_set["file"]), spec, recipe.flip, workers,
                                    processes, "cache train")
    (val_activations,) = cache_activations(trunk, list(val_set["file"]), spec, False, workers,
                                           processes, "cache val")
    seconds["cache"] = time.perf_counter() - started
    log.info("cached %s activations per image for %d view(s) in %.0f s",
             "x".join(map(str, activations[0].shape[1:])), len(activations), seconds["cache"])

    tracker = Tracker(model)
    started = time.perf_counter()
    head_epochs = 0
    if recipe.head_epochs:
        features = [pooled_features(tail, view, processes) for view in activations]
        val_features = pooled_features(tail, val_activations, processes)
        for parameter in tail.classifier.parameters():
            parameter.requires_grad_(True)
        head_epochs = train_head(tail, features, labels, val_features, val_labels, recipe, seed,
                                 tracker, processes)
        # Fine-tuning starts from the best head, not the last one.
        model.load_state_dict(tracker.best_state)
    seconds["head"] = time.perf_counter() - started

    started = time.perf_counter()
    finetune_epochs = finetune(tail, activations, labels, val_activations, val_labels, recipe,
                               seed, tracker, processes) if recipe.finetune_epochs else 0
    seconds["finetune"] = time.perf_counter() - started

    model.load_state_dict(tracker.best_state)
    model = model.to(memory_format=torch.contiguous_format).eval()
    return Result(model=model, history=pd.DataFrame(tracker.rows), best_epoch=tracker.best_epoch,
                  head_epochs_run=head_epochs, finetune_epochs_run=finetune_epochs,
                  train_images=len(train_set), seconds=seconds,
                  images_trained=len(train_set) * finetune_epochs)
