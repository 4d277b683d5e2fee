"""Group exact and near duplicate images so that a group can be kept in one split.

Near duplicates are found in two steps. Perceptual hashes within a few bits propose
candidate pairs cheaply. On catalogue photos (one model, one pose, a white background),
different garments often hash within 4 bits of each other. Chaining such pairs merged
hundreds of distinct shoes into one group on the replica data, so each candidate is
confirmed by comparing small thumbnails of the two images pixel by pixel.
"""

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

THUMBNAIL_SIDE = 32


class DisjointSet:
    """Union-find over ``0..n-1`` with path halving."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            # The smaller index becomes the root, so group ids do not depend on merge order.
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def near_pairs(hashes: list[str], max_distance: int) -> list[tuple[int, int]]:
    """Return index pairs whose 64-bit hex hashes differ in at most ``max_distance`` bits.

    Pigeonhole search: split the 64 bits into ``max_distance + 1`` blocks. Two hashes within
    the distance agree exactly on at least one block, so only hashes sharing a block value
    are compared. This stays fast for hundreds of thousands of images.
    """
    if max_distance < 0 or not hashes:
        return []
    if max_distance >= 64:
        # Every pair of 64-bit hashes is within 64 bits, and 64 one-bit blocks cannot hold
        # the max_distance + 1 blocks that the pigeonhole argument needs.
        return [(a, b) for a in range(len(hashes)) for b in range(a + 1, len(hashes))]
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    blocks = max_distance + 1
    bounds = np.linspace(0, 64, blocks + 1, dtype=int)
    pairs: set[tuple[int, int]] = set()
    for low, high in zip(bounds[:-1], bounds[1:]):
        mask = np.uint64((1 << int(high - low)) - 1)
        keys = (values >> np.uint64(low)) & mask
        buckets: dict[int, list[int]] = defaultdict(list)
        for index, key in enumerate(keys.tolist()):
            buckets[key].append(index)
        for members in buckets.values():
            if len(members) < 2:
                continue
            members_array = np.array(members)
            for position, index in enumerate(members[:-1]):
                others = members_array[position + 1:]
                distances = np.bitwise_count(values[others] ^ values[index])
                for other in others[distances <= max_distance].tolist():
                    pairs.add((index, other))
    return sorted(pairs)


def thumbnail(path: Path) -> np.ndarray:
    """Return a 32 x 32 RGB thumbnail with values in 0..1, averaged over each cell."""
    with Image.open(path) as image:
        small = image.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


def thumbnail_matcher(paths: list[Path], max_difference: float) -> Callable[[int, int], bool]:
    """Return a check that two images' thumbnails differ by at most ``max_difference`` on average.

    Measured on the replica photos: re-encoded copies of one photo differ by under 0.001,
    colour variants of one catalogue shoe by about 0.01, and most different products
    that share a perceptual hash by 0.02 or more.
    """
    cache: dict[int, np.ndarray] = {}

    def load(index: int) -> np.ndarray:
        if index not in cache:
            cache[index] = thumbnail(paths[index])
        return cache[index]

    def matches(a: int, b: int) -> bool:
        return float(np.abs(load(a) - load(b)).mean()) <= max_difference

    return matches


def group_duplicates(pixel_hashes: list[str], perceptual_hashes: list[str], max_distance: int,
                     confirm: Callable[[int, int], bool] | None = None) -> list[int]:
    """Return a group id per image: equal pixel hashes or confirmed near copies share one.

    ``confirm(a, b)`` decides candidate pairs whose perceptual hashes are within
    ``max_distance`` bits; without it every candidate counts.
    """
    groups = DisjointSet(len(pixel_hashes))
    first_seen: dict[str, int] = {}
    for index, pixel_hash in enumerate(pixel_hashes):
        if pixel_hash in first_seen:
            groups.union(first_seen[pixel_hash], index)
        else:
            first_seen[pixel_hash] = index
    for a, b in near_pairs(perceptual_hashes, max_distance):
        if groups.find(a) != groups.find(b) and (confirm is None or confirm(a, b)):
            groups.union(a, b)
    return [groups.find(index) for index in range(len(pixel_hashes))]
