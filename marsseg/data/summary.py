"""`describe`: what `marsseg-cli inspect` shows about an npz or a shard folder."""

from __future__ import annotations

from pathlib import Path

from .cleaning import (
    DEFAULT_MAX_BACKGROUND,
    DEFAULT_OUTLIER_MIN_COUNT,
    HIST_EDGES,
    bg_fraction,
    bg_histogram,
    check_max_background,
    clean_keep,
)
from .source import open_data


def describe(
    data: Path,
    max_background: float = DEFAULT_MAX_BACKGROUND,
    outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT,
) -> dict:
    """Counts, class pixel counts before/after cleaning, outliers, background histogram.

    `data` is an npz (validated and analysed in memory) or a shard folder (outlier flags
    as stored by `prepare`; `outlier_min_count` then does not apply). Cleaning = drop
    outliers and images whose background fraction exceeds `max_background`.
    """
    data = Path(data)
    check_max_background(max_background)
    source = open_data(data)
    flags = source.train_flags(outlier_min_count)
    counts, bg, outlier = flags.class_counts, flags.bg_fraction, flags.outlier
    test_counts = source.test_counts()
    keep = clean_keep(outlier, bg, max_background)
    return {
        "path": str(data),
        "kind": source.kind,
        "train": {"count": len(counts), "labeled": True, "groups": source.n_groups()},
        "test": source.split_info("test"),
        "counts": {
            "train": len(counts),
            "train_clean": int(keep.sum()),
            "outliers": int(outlier.sum()),
            "high_background": int((bg > max_background).sum()),
            "big_rock_images": int((counts[:, 4] > 0).sum()),
        },
        "class_pixel_counts": {
            "train": counts.sum(0).tolist(),
            "train_clean": counts[keep].sum(0).tolist(),
            "test": None if test_counts is None else test_counts.sum(0).tolist(),
        },
        "max_background": max_background,
        "outlier_min_count": flags.outlier_min_count,
        "duplicate_mask_groups": flags.outlier_groups,
        "uniform_duplicate_groups": flags.uniform_groups,
        "bg_fraction_histogram": {
            "edges": HIST_EDGES,
            "train": bg_histogram(bg),
            "test": None if test_counts is None else bg_histogram(bg_fraction(test_counts)),
        },
    }
