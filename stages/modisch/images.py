"""Decode untrusted image bytes into upright 8-bit RGB, and hash and encode the result.

:func:`load_image` decides the format from the content, decodes the whole image and
raises :class:`ImageRejected` with a reason code when the data cannot be used:

- ``empty_file``: zero bytes.
- ``not_an_image``: not an image container at all (text, CSV, JSON).
- ``unsupported_format``: an image, but not JPEG, PNG, WebP, BMP, TIFF or GIF.
- ``too_many_pixels``: header width x height above the limit, checked before decoding.
- ``corrupt``: an image container with truncated or undecodable data.
- ``too_small``: shorter side below the minimum.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import imagehash
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_MANY_PIXELS = "too_many_pixels"
CORRUPT = "corrupt"
TOO_SMALL = "too_small"

# Same value as ingest.max_pixels in params.yaml.
DEFAULT_MAX_PIXELS = 40_000_000

# Accepted formats, as Pillow names them, with the file extensions of each.
FORMAT_EXTENSIONS: dict[str, frozenset[str]] = {
    "JPEG": frozenset({".jpg", ".jpeg", ".jpe", ".jfif"}),
    "PNG": frozenset({".png"}),
    "WEBP": frozenset({".webp"}),
    "BMP": frozenset({".bmp", ".dib"}),
    "TIFF": frozenset({".tif", ".tiff"}),
    "GIF": frozenset({".gif"}),
}
IMAGE_EXTENSIONS: frozenset[str] = frozenset().union(*FORMAT_EXTENSIONS.values())

# Pillow opens multi-picture JPEGs from cameras as MPO, and their first frame is a JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# ISO-BMFF brands of HEIF and AVIF files, which this pipeline does not decode.
_HEIF_BRANDS = {
    b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
    b"mif1", b"msf1", b"avif", b"avis",
}

# File signatures of image containers: data that starts like this but that Pillow
# cannot read is a damaged image, not some other kind of file.
_IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
    b"II+\x00",  # BigTIFF
    b"MM\x00+",
)

# Exceptions that Pillow and its decoders raise for bad image data.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    struct.error,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)

_SYSTEM_FILE_NAMES = {".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini"}


class ImageRejected(Exception):
    """Image data that cannot be used, with a ``reason`` code and a ``detail`` sentence."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class LoadedImage:
    """A fully decoded image, converted to upright 8-bit RGB."""

    image: Image.Image  # mode "RGB", EXIF orientation applied
    format: str  # format detected from the content, e.g. "JPEG"
    mode: str  # colour mode before conversion, e.g. "CMYK", "P", "I;16"
    width: int  # size of the upright image
    height: int
    extension_mismatch: bool  # the name's extension is missing or not one of the format's


def is_system_file(path: str) -> bool:
    """Return True for files that operating systems add to folders and archives.

    These are .DS_Store, Thumbs.db, ehthumbs.db, desktop.ini, AppleDouble files
    ("._name") and anything under a __MACOSX folder.
    """
    parts = path.replace("\\", "/").split("/")
    if "__MACOSX" in parts[:-1]:
        return True
    name = parts[-1]
    return name.lower() in _SYSTEM_FILE_NAMES or name.startswith("._")


def load_image(data: bytes, name: str, *, max_pixels: int, min_side: int) -> LoadedImage:
    """Decode image bytes into an upright 8-bit RGB image.

    ``name`` is used only to compare its extension with the detected format and in
    messages. Raises :class:`ImageRejected` for every input that cannot be used.
    """
    if not data:
        raise ImageRejected(EMPTY_FILE, f"{name} is empty (0 bytes).")
    _reject_heif(data, name)

    image = _open(data, name)
    try:
        return _decode(image, data, name, max_pixels=max_pixels, min_side=min_side)
    finally:
        image.close()


def load_image_file(
    path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1
) -> LoadedImage:
    """Read and decode an image file with the same rules as :func:`load_image`."""
    path = Path(path)
    return load_image(path.read_bytes(), path.name, max_pixels=max_pixels, min_side=min_side)


def _reject_heif(data: bytes, name: str) -> None:
    # An ISO-BMFF file starts with a box size (4 bytes), "ftyp" and the major brand.
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        brand = data[8:12].decode("ascii")
        raise ImageRejected(
            UNSUPPORTED_FORMAT,
            f"{name} is a HEIF/AVIF image (brand {brand}); convert it to JPEG or PNG.",
        )


def _open(data: bytes, name: str) -> Image.Image:
    """Open the image lazily, which parses the header but decodes no pixels."""
    try:
        with warnings.catch_warnings():
            # The max_pixels check in _decode replaces Pillow's warning, and Pillow's
            # DecompressionBombError (at twice Image.MAX_IMAGE_PIXELS) is mapped below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageRejected(TOO_MANY_PIXELS, f"{name}: {error}") from error
    except UnidentifiedImageError as error:
        if data.startswith(_IMAGE_SIGNATURES) or _is_riff_webp(data):
            raise ImageRejected(CORRUPT, f"{name} starts like an image but cannot be read.") from error
        raise ImageRejected(NOT_AN_IMAGE, f"{name} is not an image file.") from error
    except DECODE_ERRORS as error:
        raise ImageRejected(CORRUPT, f"{name} has an unreadable image header ({error}).") from error


def _is_riff_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _decode(
    image: Image.Image, data: bytes, name: str, *, max_pixels: int, min_side: int
) -> LoadedImage:
    image_format = _FORMAT_ALIASES.get(image.format, image.format)
    if image_format not in FORMAT_EXTENSIONS:
        raise ImageRejected(
            UNSUPPORTED_FORMAT,
            f"{name} is a {image.format} image; accepted formats are {', '.join(FORMAT_EXTENSIONS)}.",
        )

    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            TOO_MANY_PIXELS,
            f"{name} is {width}x{height} pixels, above the limit of {max_pixels} pixels.",
        )
    if min(width, height) < min_side:
        raise ImageRejected(
            TOO_SMALL, f"{name} is {width}x{height} pixels, but the shorter side must be at least {min_side}."
        )

    original_mode = image.mode
    try:
        # load() decodes every pixel of the first frame, so truncated data fails here
        # unless other code has set ImageFile.LOAD_TRUNCATED_IMAGES to True.
        image.load()
        upright = _apply_orientation(image, name)
        rgb = to_rgb(upright)
    except DECODE_ERRORS as error:
        raise ImageRejected(CORRUPT, f"{name} cannot be decoded ({error}).") from error

    extension = PurePosixPath(name.replace("\\", "/")).suffix.lower()
    return LoadedImage(
        image=rgb,
        format=image_format,
        mode=original_mode,
        width=rgb.width,
        height=rgb.height,
        extension_mismatch=extension not in FORMAT_EXTENSIONS[image_format],
    )


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        exif = image.getexif()
    except DECODE_ERRORS as error:
        # NOTE: the pixels are kept without rotation, because a broken EXIF block rarely
        # holds a usable orientation and the image data itself decoded fine.
        logger.warning("%s: unreadable EXIF data ignored, image kept as stored (%s)", name, error)
        return image
    if exif.get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white.

    16-bit and 32-bit integer modes are scaled from 0..65535 to 0..255 with rounding.
    Float images are read as 0..1 when no value is above 1, else as 0..255 and clipped.
    """
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _scale_to_rgb(np.asarray(image).astype(np.int64), 65535)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        peak = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        return _scale_to_rgb(np.clip(values, 0.0, peak) / peak * 65535, 65535)

    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    if mode == "1":
        image = image.convert("L")
    return image.convert("RGB")


def _scale_to_rgb(values: np.ndarray, peak: int) -> Image.Image:
    """Scale integer or float values in 0..peak to uint8, round to nearest, as grey RGB."""
    values = np.clip(np.rint(values), 0, peak).astype(np.int64)
    scaled = ((values * 255 + peak // 2) // peak).astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longest side is ``max_side``, keeping the aspect ratio.

    Returns the image itself when its longest side is already at most ``max_side``.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}.")
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image

    new_width = max(1, round(width * max_side / longest))
    new_height = max(1, round(height * max_side / longest))
    return image.resize((new_width, new_height), Image.Resampling.LANCZOS, reducing_gap=3.0)


def pixel_sha256(image: Image.Image) -> str:
    """Return the hex SHA-256 of the size, mode and raw pixel bytes."""
    digest = hashlib.sha256()
    digest.update(f"{image.width}x{image.height} {image.mode}\n".encode("ascii"))
    digest.update(image.tobytes())
    return digest.hexdigest()


def perceptual_hash(image: Image.Image) -> str:
    """Return the 64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits."""
    return str(imagehash.phash(image))


def hamming_distance(hash_a: str, hash_b: str) -> int:
    """Return the number of differing bits between two hex hashes of equal length."""
    if len(hash_a) != len(hash_b):
        raise ValueError(f"hashes differ in length: {hash_a!r} and {hash_b!r}.")
    return (int(hash_a, 16) ^ int(hash_b, 16)).bit_count()


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Encode as baseline JPEG with 4:2:0 chroma subsampling and no metadata.

    The same pixels and quality give the same bytes, because the copy that is saved has
    no EXIF, ICC profile, DPI or comment.
    """
    rgb = image if image.mode == "RGB" else to_rgb(image)
    bare = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, "JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    return buffer.getvalue()
