"""Tests for modisch.duplicates: pigeonhole hash search, grouping and thumbnail checks."""

import io
import itertools
import random
from pathlib import Path

import pytest
from PIL import Image

from modisch.duplicates import group_duplicates, near_pairs, thumbnail_matcher

FIXTURES = Path(__file__).parent / "fixtures" / "replica"
PHOTO = next(iter(sorted((FIXTURES / "clothes" / "Clothes_Dataset" / "Blazer").glob("*.jpg"))))


def brute_force_pairs(hashes: list[str], max_distance: int) -> list[tuple[int, int]]:
    values = [int(h, 16) for h in hashes]
    return [(a, b) for a, b in itertools.combinations(range(len(values)), 2)
            if (values[a] ^ values[b]).bit_count() <= max_distance]


def random_hashes(count: int, seed: int, max_flips: int) -> list[str]:
    """Return hashes in small clusters, so that every distance range has pairs."""
    rng = random.Random(seed)
    values = []
    while len(values) < count:
        base = rng.getrandbits(64)
        values.append(base)
        for _ in range(rng.randint(0, 4)):
            flipped = base
            for bit in rng.sample(range(64), rng.randint(0, max_flips)):
                flipped ^= 1 << bit
            values.append(flipped)
    return [f"{value:016x}" for value in values[:count]]


@pytest.mark.parametrize("max_distance", [0, 1, 2, 4, 7, 10, 16, 31])
@pytest.mark.parametrize("seed", [1, 2])
def test_near_pairs_matches_brute_force(max_distance, seed):
    hashes = random_hashes(300, seed, max_flips=max_distance + 3)

    expected = brute_force_pairs(hashes, max_distance)

    assert near_pairs(hashes, max_distance) == expected
    assert expected, "the random hashes should contain at least one near pair"


@pytest.mark.parametrize(
    ("hashes", "max_distance", "expected"),
    [
        ([], 4, []),
        (["0" * 16], 4, []),
        (["0" * 16, "0" * 16], 0, [(0, 1)]),
        (["0" * 16, "0" * 15 + "1"], 0, []),
        (["0" * 16, "0" * 15 + "1"], 1, [(0, 1)]),
        (["0" * 16, "0" * 15 + "1"], -1, []),
        # Complementary hashes differ in all 64 bits.
        (["0" * 16, "f" * 16], 63, []),
        (["0" * 16, "f" * 16], 64, [(0, 1)]),
        (["0" * 16, "f" * 16, "0f" * 8], 70, [(0, 1), (0, 2), (1, 2)]),
    ],
)
def test_near_pairs_edge_cases(hashes, max_distance, expected):
    assert near_pairs(hashes, max_distance) == expected


@pytest.mark.parametrize(
    ("pixel_hashes", "perceptual_hashes", "expected"),
    [
        # Exact copies share a group whatever their perceptual hashes.
        (["a", "b", "a"], ["0" * 16, "f" * 16, "ff" * 4 + "00" * 4], [0, 1, 0]),
        # Near copies share a group, whose id is its smallest member index.
        (["a", "b", "c"], ["f" * 16, "0" * 16, "0" * 15 + "3"], [0, 1, 1]),
        # Chains join: 0 ~ 1 by pixels, 1 ~ 2 by hash.
        (["a", "a", "c"], ["f" * 16, "0" * 16, "0" * 15 + "1"], [0, 0, 0]),
        (["a", "b", "c"], ["0" * 16, "f" * 16, "ff" * 8], [0, 1, 1]),
    ],
)
def test_group_duplicates_without_confirmation(pixel_hashes, perceptual_hashes, expected):
    assert group_duplicates(pixel_hashes, perceptual_hashes, 4) == expected


def test_group_duplicates_confirm_rejects_pair():
    pixel_hashes = ["a", "b", "c"]
    perceptual_hashes = ["0" * 16, "0" * 16, "0" * 16]
    confirmed = {(0, 2)}

    groups = group_duplicates(pixel_hashes, perceptual_hashes, 4,
                              lambda a, b: (a, b) in confirmed)

    assert groups == [0, 1, 0]


def test_group_duplicates_exact_copies_skip_confirm():
    calls = []

    groups = group_duplicates(["a", "a"], ["0" * 16, "f" * 16], 4,
                              lambda a, b: calls.append((a, b)) or False)

    assert groups == [0, 0]
    assert calls == []


def save_jpeg(image: Image.Image, path: Path, quality: int) -> Path:
    image.save(path, "JPEG", quality=quality)
    return path


def test_thumbnail_matcher_accepts_reencoded_copy(tmp_path):
    with Image.open(PHOTO) as photo:
        original = photo.convert("RGB")
    copy = original.resize((original.width // 2, original.height // 2))
    paths = [save_jpeg(original, tmp_path / "a.jpg", 95), save_jpeg(copy, tmp_path / "b.jpg", 70)]

    assert thumbnail_matcher(paths, 0.01)(0, 1)


def test_thumbnail_matcher_rejects_different_image(tmp_path):
    with Image.open(PHOTO) as photo:
        original = photo.convert("RGB")
    # A brightness shift of 20 levels moves most thumbnail values far past the 0.01 limit.
    shifted = Image.eval(original, lambda value: min(255, value + 20))
    paths = [save_jpeg(original, tmp_path / "a.jpg", 95),
             save_jpeg(shifted, tmp_path / "b.jpg", 95)]

    matches = thumbnail_matcher(paths, 0.01)

    assert not matches(0, 1)
    assert matches(0, 0)
