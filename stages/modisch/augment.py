"""PIL augmentations for the on-disk oversampling of the train split."""

import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps


@dataclass(frozen=True)
class AugmentSettings:
    mirror: float          # probability of a horizontal flip
    rotate_degrees: float  # maximum absolute rotation
    brightness: float      # maximum relative brightness change
    contrast: float        # maximum relative contrast change


def augment(image: Image.Image, settings: AugmentSettings, rng: random.Random) -> Image.Image:
    """Return a randomly mirrored, rotated, brightened and contrasted copy of ``image``."""
    if rng.random() < settings.mirror:
        image = ImageOps.mirror(image)
    if settings.rotate_degrees:
        angle = rng.uniform(-settings.rotate_degrees, settings.rotate_degrees)
        # Corners uncovered by the rotation are filled with the image's mean colour, which
        # draws less attention than black or white.
        fill = tuple(int(v) for v in image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if settings.brightness:
        image = ImageEnhance.Brightness(image).enhance(
            1 + rng.uniform(-settings.brightness, settings.brightness))
    if settings.contrast:
        image = ImageEnhance.Contrast(image).enhance(
            1 + rng.uniform(-settings.contrast, settings.contrast))
    return image
