"""Turn images into model input exactly as the exported model expects, without torch.

The preprocessing is described by a small dict that the export stage writes into the
ONNX metadata, so evaluation and prediction read it from the model they run:

``{"resize": "shorter_side", "size": 224, "interpolation": "bilinear", "crop": "center",
"channel_order": "RGB", "scale": 0.00392156862745098, "mean": [0, 0, 0], "std": [1, 1, 1],
"layout": "NCHW"}``

For YOLO-cls this reproduces ultralytics' eval transform (torchvision ``Resize(size)`` on
a PIL image, ``CenterCrop(size)``, ``ToTensor``), so ONNX and PyTorch see equal pixels.
"""

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def yolo_preprocessing(imgsz: int) -> dict:
    """Return the preprocessing spec of an ultralytics classify model at ``imgsz``."""
    return {"resize": "shorter_side", "size": imgsz, "interpolation": "bilinear",
            "crop": "center", "channel_order": "RGB", "scale": 1 / 255,
            "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "layout": "NCHW"}


def resize_shorter_side(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so the shorter side is ``size``, the longer one truncated as torchvision does."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size == image.size:
        return image
    return image.resize(new_size, INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` square, rounding the offset as torchvision does."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """Return one image as a float32 array in the layout of ``spec`` (without batch axis)."""
    if spec["resize"] != "shorter_side" or spec["crop"] != "center":
        raise ValueError(f"unsupported preprocessing {spec['resize']}/{spec['crop']}; "
                         f"expected shorter_side/center")
    image = image.convert("RGB")
    image = center_crop(resize_shorter_side(image, int(spec["size"]), spec["interpolation"]),
                        int(spec["size"]))
    pixels = np.asarray(image, dtype=np.float32)
    if spec["channel_order"] == "BGR":
        pixels = pixels[..., ::-1]
    pixels = pixels * np.float32(spec["scale"])
    pixels = (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    if spec["layout"] == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)
