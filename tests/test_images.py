"""Tests for modisch.images, on tiny images generated in each test."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from modisch.images import (
    IMAGE_EXTENSIONS,
    ImageRejected,
    encode_jpeg,
    hamming_distance,
    is_system_file,
    load_image,
    load_image_file,
    perceptual_hash,
    pixel_sha256,
    shrink,
)

MAX_PIXELS = 1_000_000


def save(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + data)
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", crc)


def png_by_hand(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """Build a PNG from raw scanlines, each already prefixed with filter byte 0."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def rgb_image(size=(40, 30), color=(200, 40, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def gradient(size=(64, 64)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)
    red = np.tile(x, (size[1], 1))
    green = np.tile(y[:, None], (1, size[0]))
    blue = np.full((size[1], size[0]), 90, dtype=np.uint8)
    return Image.fromarray(np.dstack([red, green, blue]), "RGB")


def shapes(size=(128, 128)) -> Image.Image:
    """Grey background with a dark ellipse and a light bar: stable under resizing."""
    image = Image.new("RGB", size, (120, 120, 120))
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(20, 30, 40))
    draw.rectangle((width // 2, height * 5 // 8, width * 7 // 8, height * 7 // 8), fill=(240, 230, 200))
    return image


def grey16_png() -> bytes:
    values = np.array([[65535, 32768, 0, 257]] * 4, dtype=">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in values)
    return png_by_hand(4, 4, 16, 0, rows)


def rgb16_png() -> bytes:
    pixel_row = np.array([[65535, 32768, 0], [0, 65535, 32768]] * 2, dtype=">u2")
    rows = b"".join(b"\x00" + pixel_row.tobytes() for _ in range(4))
    return png_by_hand(4, 4, 16, 2, rows)


def huge_header_png(width: int, height: int) -> bytes:
    """A valid PNG header that declares a huge size, followed by one tiny row of data."""
    return png_by_hand(width, height, 8, 0, b"\x00" * 9)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putpixel((1, 1), 1)
    return save(image, "PNG", transparency=0)


def rgba_png() -> bytes:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((1, 1), (0, 0, 255, 255))
    image.putpixel((2, 2), (0, 0, 0, 128))
    return save(image, "PNG")


def la_png() -> bytes:
    image = Image.new("LA", (4, 4), (0, 0))
    image.putpixel((1, 1), (0, 255))
    return save(image, "PNG")


def cmyk_jpeg() -> bytes:
    return save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100)


def float_tiff() -> bytes:
    values = np.array([[0.0, 0.5, 1.0, 1.0]] * 4, dtype=np.float32)
    return save(Image.fromarray(values, "F"), "TIFF")


def exif_rotated_png() -> bytes:
    """8x4 blue image, red 2x2 block at the top left, EXIF orientation 6 (rotate 90 CW)."""
    image = Image.new("RGB", (8, 4), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(image, "PNG", exif=exif.tobytes())


def truncated_png() -> bytes:
    data = save(gradient(), "PNG")
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = save(gradient(), "JPEG", quality=90)
    return data[: len(data) // 2]


ACCEPTED_CASES = [
    # case id, data, name, expected format, expected original mode, extension mismatch
    ("jpeg", save(rgb_image(), "JPEG"), "a.jpg", "JPEG", "RGB", False),
    ("png", save(rgb_image(), "PNG"), "a.png", "PNG", "RGB", False),
    ("webp", save(rgb_image(), "WEBP", lossless=True), "a.webp", "WEBP", "RGB", False),
    ("bmp", save(rgb_image(), "BMP"), "a.bmp", "BMP", "RGB", False),
    ("tiff", save(rgb_image(), "TIFF"), "a.tif", "TIFF", "RGB", False),
    ("gif", save(rgb_image().convert("P"), "GIF"), "a.gif", "GIF", "P", False),
    ("png named jpg", save(rgb_image(), "PNG"), "a.jpg", "PNG", "RGB", True),
    ("no extension", save(rgb_image(), "PNG"), "README", "PNG", "RGB", True),
    ("upper-case extension", save(rgb_image(), "JPEG"), "A.JPEG", "JPEG", "RGB", False),
    ("greyscale", save(rgb_image().convert("L"), "PNG"), "g.png", "PNG", "L", False),
    ("one bit", save(rgb_image().convert("1"), "PNG"), "b.png", "PNG", "1", False),
    ("cmyk jpeg", cmyk_jpeg(), "c.jpg", "JPEG", "CMYK", False),
    ("palette transparency", palette_with_transparency(), "p.png", "PNG", "P", False),
    ("rgba", rgba_png(), "r.png", "PNG", "RGBA", False),
    ("la", la_png(), "la.png", "PNG", "LA", False),
    ("16-bit grey", grey16_png(), "g16.png", "PNG", "I;16", False),
    ("16-bit rgb", rgb16_png(), "c16.png", "PNG", "RGB", False),
    ("float", float_tiff(), "f.tiff", "TIFF", "F", False),
]


@pytest.mark.parametrize(
    ("data", "name", "image_format", "mode", "mismatch"),
    [case[1:] for case in ACCEPTED_CASES],
    ids=[case[0] for case in ACCEPTED_CASES],
)
def test_load_image_accepts(data, name, image_format, mode, mismatch):
    loaded = load_image(data, name, max_pixels=MAX_PIXELS, min_side=1)

    assert loaded.format == image_format
    assert loaded.mode == mode
    assert loaded.extension_mismatch is mismatch
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (loaded.width, loaded.height)


REJECTED_CASES = [
    # case id, data, name, min_side, expected reason
    ("empty file", b"", "a.jpg", 1, "empty_file"),
    ("text file", b"label,file\nboot,a.jpg\n", "labels.csv", 1, "not_an_image"),
    ("garbage named jpg", bytes(range(7, 250)) * 3, "x.jpg", 1, "not_an_image"),
    ("jpeg signature then garbage", b"\xff\xd8\xff\xe0" + b"\x13" * 300, "x.jpg", 1, "corrupt"),
    ("truncated jpeg", truncated_jpeg(), "t.jpg", 1, "corrupt"),
    ("truncated png", truncated_png(), "t.png", 1, "corrupt"),
    ("heic header", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "a.heic", 1, "unsupported_format"),
    ("avif header", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "a.avif", 1, "unsupported_format"),
    ("ppm format", save(rgb_image(), "PPM"), "a.ppm", 1, "unsupported_format"),
    ("header over max_pixels", huge_header_png(2000, 1000), "big.png", 1, "too_many_pixels"),
    ("header over pillow limit", huge_header_png(100_000, 100_000), "huge.png", 1, "too_many_pixels"),
    ("too small", save(rgb_image((40, 6)), "PNG"), "small.png", 8, "too_small"),
]


@pytest.mark.parametrize(
    ("data", "name", "min_side", "reason"),
    [case[1:] for case in REJECTED_CASES],
    ids=[case[0] for case in REJECTED_CASES],
)
def test_load_image_rejects(data, name, min_side, reason):
    with pytest.raises(ImageRejected) as caught:
        load_image(data, name, max_pixels=MAX_PIXELS, min_side=min_side)

    assert caught.value.reason == reason
    assert name in caught.value.detail


PIXEL_CASES = [
    # case id, data, name, [(x, y), expected RGB, tolerance]
    ("palette transparency on white", palette_with_transparency(), "p.png",
     [((0, 0), (255, 255, 255), 0), ((1, 1), (255, 0, 0), 0)]),
    ("rgba on white", rgba_png(), "r.png",
     [((0, 0), (255, 255, 255), 0), ((1, 1), (0, 0, 255), 0), ((2, 2), (127, 127, 127), 1)]),
    ("la on white", la_png(), "la.png", [((0, 0), (255, 255, 255), 0), ((1, 1), (0, 0, 0), 0)]),
    ("16-bit grey scaled", grey16_png(), "g16.png",
     [((0, 0), (255, 255, 255), 0), ((1, 0), (128, 128, 128), 0), ((2, 0), (0, 0, 0), 0), ((3, 0), (1, 1, 1), 0)]),
    ("16-bit rgb scaled", rgb16_png(), "c16.png",
     [((0, 0), (255, 128, 0), 0), ((1, 0), (0, 255, 128), 0)]),
    ("cmyk red", cmyk_jpeg(), "c.jpg", [((8, 8), (255, 0, 0), 3)]),
    ("float scaled", float_tiff(), "f.tiff",
     [((0, 0), (0, 0, 0), 0), ((1, 0), (128, 128, 128), 0), ((2, 0), (255, 255, 255), 0)]),
]


@pytest.mark.parametrize(
    ("data", "name", "expected_pixels"),
    [case[1:] for case in PIXEL_CASES],
    ids=[case[0] for case in PIXEL_CASES],
)
def test_load_image_pixel_values(data, name, expected_pixels):
    image = load_image(data, name, max_pixels=MAX_PIXELS, min_side=1).image

    for position, expected, tolerance in expected_pixels:
        actual = image.getpixel(position)
        differences = [abs(a - e) for a, e in zip(actual, expected)]
        assert max(differences) <= tolerance, f"pixel {position}: {actual}, expected {expected}"


def test_load_image_exif_orientation_upright():
    loaded = load_image(exif_rotated_png(), "r.png", max_pixels=MAX_PIXELS, min_side=1)

    # Rotating the 8x4 image 90 degrees clockwise moves the top-left block to the top right.
    assert (loaded.width, loaded.height) == (4, 8)
    assert loaded.image.getpixel((3, 0)) == (255, 0, 0)
    assert loaded.image.getpixel((2, 1)) == (255, 0, 0)
    assert loaded.image.getpixel((0, 0)) == (0, 0, 255)
    assert loaded.image.getpixel((3, 7)) == (0, 0, 255)


def test_load_image_gif_first_frame():
    frames = [Image.new("P", (8, 8), 1), Image.new("P", (8, 8), 2)]
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3)
    for frame in frames:
        frame.putpalette(palette)
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:])

    loaded = load_image(data, "anim.gif", max_pixels=MAX_PIXELS, min_side=1)

    assert loaded.image.getpixel((0, 0)) == (255, 0, 0)


def test_load_image_file_reads_path(tmp_path):
    path = tmp_path / "shoe.png"
    path.write_bytes(save(rgb_image(), "PNG"))

    loaded = load_image_file(path)

    assert loaded.format == "PNG"
    assert loaded.image.getpixel((0, 0)) == (200, 40, 10)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (".DS_Store", True),
        ("shoes/boots/.DS_Store", True),
        ("shoes/Thumbs.db", True),
        ("shoes/thumbs.db", True),
        ("shoes/desktop.ini", True),
        ("shoes/._a.jpg", True),
        ("__MACOSX/shoes/a.jpg", True),
        ("data.zip/__MACOSX/shoes/._a.jpg", True),
        ("shoes/a.jpg", False),
        ("shoes/.hidden.jpg", False),
        ("__MACOSX", False),
    ],
)
def test_is_system_file_cases(path, expected):
    assert is_system_file(path) is expected


def test_image_extensions_lowercase_with_dot():
    assert ".jpg" in IMAGE_EXTENSIONS
    assert ".webp" in IMAGE_EXTENSIONS
    assert all(extension.startswith(".") and extension == extension.lower() for extension in IMAGE_EXTENSIONS)


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((1000, 500), 512, (512, 256)),
        ((300, 900), 512, (171, 512)),
        ((100, 50), 512, (100, 50)),
        ((512, 512), 512, (512, 512)),
        ((4000, 1), 512, (512, 1)),
    ],
)
def test_shrink_sizes(size, max_side, expected):
    assert shrink(Image.new("RGB", size), max_side).size == expected


def test_encode_jpeg_deterministic():
    image = gradient()
    image.info["comment"] = b"not written"

    first = encode_jpeg(image, 90)
    second = encode_jpeg(image.copy(), 90)

    assert first == second
    assert first.startswith(b"\xff\xd8")
    assert b"Exif" not in first


def test_pixel_sha256_same_for_png_and_bmp():
    image = gradient()
    from_png = load_image(save(image, "PNG"), "a.png", max_pixels=MAX_PIXELS, min_side=1).image
    from_bmp = load_image(save(image, "BMP"), "a.bmp", max_pixels=MAX_PIXELS, min_side=1).image

    assert pixel_sha256(from_png) == pixel_sha256(from_bmp)
    assert pixel_sha256(from_png) != pixel_sha256(from_png.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def test_perceptual_hash_resized_copy_close():
    image = shapes()
    resized = image.resize((64, 64), Image.Resampling.BICUBIC)

    assert len(perceptual_hash(image)) == 16
    assert hamming_distance(perceptual_hash(image), perceptual_hash(resized)) <= 4


def test_perceptual_hash_different_image_far():
    image = shapes()
    checkerboard = Image.fromarray(
        (np.indices((128, 128)).sum(axis=0) // 16 % 2 * 255).astype(np.uint8), "L"
    ).convert("RGB")

    assert hamming_distance(perceptual_hash(image), perceptual_hash(checkerboard)) > 16


def test_hamming_distance_values():
    assert hamming_distance("00ff", "00ff") == 0
    assert hamming_distance("0000", "000f") == 4
    with pytest.raises(ValueError):
        hamming_distance("00", "0000")
