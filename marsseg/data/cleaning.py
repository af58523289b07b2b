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
    by_hash: dict[bytes, list[int]] = {}
    for i, m in enumerate(masks):
        by_hash.setdefault(hashlib.blake2b(m.tobytes(), digest_size=16).digest(), []).append(i)
    outliers, uniform = [], []
    for ids in by_hash.values():
        if len(ids) < min_count:
            continue
        labeled = sorted(int(c) for c in np.unique(masks[ids[0]]) if c != 0)
        entry = {"count": len(ids), "ids": ids, "classes": labeled}
        (outliers if len(labeled) >= 2 else uniform).append(entry)
    outliers.sort(key=lambda g: (-g["count"], g["ids"][0]))
    uniform.sort(key=lambda g: (-g["count"], g["ids"][0]))
    return outliers, uniform


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


def flag_images(masks: np.ndarray, outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT) -> Flags:
    """Count classes, background and duplicate-mask outliers of masks uint8 (n, H, W)."""
    counts = class_counts(masks)
    groups_out, groups_uniform = duplicate_mask_groups(masks, outlier_min_count)
    outlier = np.zeros(len(counts), bool)
    for g in groups_out:
        outlier[g["ids"]] = True
    return Flags(counts, bg_fraction(counts), outlier, groups_out, groups_uniform,
                 outlier_min_count)


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
