"""Cleaning facts per image: class pixel counts, background fraction, duplicate-mask outliers.

`prepare` stores them in the shards and `describe` reports them; both compute them
here (`flag_images`), and recipes choose what to skip (`clean_keep` is the standard rule).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .. import IMAGE_SHAPE, NUM_CLASSES

DEFAULT_OUTLIER_MIN_COUNT = 10
DEFAULT_MAX_BACKGROUND = 0.8
HIST_EDGES = [round(0.1 * i, 1) for i in range(11)]


def class_counts(masks: np.ndarray) -> np.ndarray:
    """Per-image class pixel counts: masks uint8 (n, H, W) -> int64 (n, 5)."""
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0, NUM_CLASSES), np.int64)
    flat = masks.reshape(n, -1).astype(np.int64) + NUM_CLASSES * np.arange(n)[:, None]
    return np.bincount(flat.ravel(), minlength=n * NUM_CLASSES).reshape(n, NUM_CLASSES)


def bg_fraction(counts: np.ndarray) -> np.ndarray:
    """Background share of each image: class counts (n, 5) -> float32 (n,) in 0..1.

    Exact: a count over 64 x 128 = 2**13 pixels is representable in float32.
    """
    return (counts[:, 0] / float(np.prod(IMAGE_SHAPE))).astype(np.float32)


class _DuplicateMasks:
    """Masks shared identically by >= min_count images, found chunk by chunk (`add`)."""

    def __init__(self, min_count: int):
        self.min_count = min_count
        self.by_hash: dict[bytes, list[int]] = {}
        self.classes: dict[bytes, list[int]] = {}  # labeled classes of each distinct mask
        self.n = 0

    def add(self, masks: np.ndarray) -> None:
        for m in masks:
            key = hashlib.blake2b(m.tobytes(), digest_size=16).digest()
            ids = self.by_hash.setdefault(key, [])
            if not ids:
                present = np.flatnonzero(np.bincount(m.ravel(), minlength=NUM_CLASSES))
                self.classes[key] = [int(c) for c in present if c != 0]
            ids.append(self.n)
            self.n += 1

    def groups(self) -> tuple[list[dict], list[dict]]:
        outliers, uniform = [], []
        for key, ids in self.by_hash.items():
            if len(ids) < self.min_count:
                continue
            labeled = self.classes[key]
            entry = {"count": len(ids), "ids": ids, "classes": labeled}
            (outliers if len(labeled) >= 2 else uniform).append(entry)
        outliers.sort(key=lambda g: (-g["count"], g["ids"][0]))
        uniform.sort(key=lambda g: (-g["count"], g["ids"][0]))
        return outliers, uniform


def duplicate_mask_groups(
    masks: np.ndarray, min_count: int = DEFAULT_OUTLIER_MIN_COUNT
) -> tuple[list[dict], list[dict]]:
    """Masks shared identically by >= min_count images.

    Returns (outlier groups, uniform groups), each a list of {"count", "ids", "classes"}
    sorted by count. A shared mask with two or more labeled classes is an outlier group
    (like the course file's 110 "alien" images). A shared mask with a single labeled
    class is not: a band that is all soil with the same border occurs naturally (real_mars
    has 24 of them), so those groups are reported but not flagged.
    """
    dup = _DuplicateMasks(min_count)
    dup.add(masks)
    return dup.groups()


@dataclass(frozen=True)
class Flags:
    """The cleaning facts of a labeled split.

    class_counts int64 (n, 5); bg_fraction float32 (n,); outlier bool (n,); the duplicate
    groups as `duplicate_mask_groups` returns them, found with `outlier_min_count`.
    """

    class_counts: np.ndarray
    bg_fraction: np.ndarray
    outlier: np.ndarray
    outlier_groups: list[dict]
    uniform_groups: list[dict]
    outlier_min_count: int


class FlagBuilder:
    """`flag_images` over a stream: `add` each chunk of masks in row order, then `flags()`."""

    def __init__(self, outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT):
        self.outlier_min_count = outlier_min_count
        self._counts: list[np.ndarray] = []
        self._dup = _DuplicateMasks(outlier_min_count)

    def add(self, masks: np.ndarray) -> None:
        self._counts.append(class_counts(masks))
        self._dup.add(masks)

    def flags(self) -> Flags:
        counts = (np.concatenate(self._counts) if self._counts
                  else np.zeros((0, NUM_CLASSES), np.int64))
        groups_out, groups_uniform = self._dup.groups()
        outlier = np.zeros(len(counts), bool)
        for g in groups_out:
            outlier[g["ids"]] = True
        return Flags(counts, bg_fraction(counts), outlier, groups_out, groups_uniform,
                     self.outlier_min_count)


def flag_images(masks: np.ndarray, outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT) -> Flags:
    """Count classes, background and duplicate-mask outliers of masks uint8 (n, H, W)."""
    b = FlagBuilder(outlier_min_count)
    b.add(masks)
    return b.flags()


def bg_histogram(bg: np.ndarray) -> list[int]:
    """Counts of background fraction in ten bins 0-0.1 ... 0.9-1.0 (1.0 in the last)."""
    return np.histogram(bg, bins=HIST_EDGES)[0].astype(int).tolist()


def clean_keep(outlier: np.ndarray, bg: np.ndarray, max_background: float) -> np.ndarray:
    """Rows kept by the standard cleaning: not an outlier and background <= max_background."""
    return ~outlier.astype(bool) & (bg <= max_background)


def check_max_background(max_background: float, where: str = "") -> None:
    """InputError unless 0 <= max_background <= 1 (prefixed with `where`, a path, if given)."""
    from ..errors import InputError

    if not 0.0 <= max_background <= 1.0:
        prefix = f"{where}: " if where else ""
        raise InputError(f"{prefix}--max-background must be in 0..1 (got {max_background})")
