"""Data given on the command line: a course npz or a prepared shard folder, read alike.

`open_data` is the one place that tells the two apart; `as_batches`, `split_info` and
`describe` ask the object it returns. A command opens its data once and hands the
source along: a shard folder's dataset.json is read once per source (`ShardSource.info`),
an npz is loaded once (`NpzSource.data`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import shards
from .cleaning import DEFAULT_OUTLIER_MIN_COUNT, Flags, class_counts, flag_images
from .npz import NpzData, load_npz


class _Source:
    kind: str

    def __init__(self, path: Path):
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def check(self, split: str) -> None:
        """Check the stored files of ``split`` before any work (a shard folder's sha256s)."""


class NpzSource(_Source):
    """An npz, validated and held in memory on first use."""

    kind = "npz"

    @cached_property
    def data(self) -> NpzData:
        return load_npz(self.path)

    def split_info(self, split: str) -> dict:
        images, masks, _ = self.data.arrays(split)
        return {"count": len(images), "labeled": masks is not None}

    def batches(self, split: str, batch_size: int, with_masks: bool) -> Iterator[tuple]:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1 (got {batch_size})")
        images, masks, _ = self.data.arrays(split)
        if with_masks and masks is None:
            raise InputError(f"{self.path}: split '{split}' has no masks (no 'test_masks' key)")

        def gen():
            for s in range(0, len(images), batch_size):
                ids = np.arange(s, min(s + batch_size, len(images)), dtype=np.int64)
                yield (ids, images[s : s + batch_size]) + (
                    (masks[s : s + batch_size],) if with_masks else ()
                )

        return gen()

    def train_flags(self, outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT) -> Flags:
        return flag_images(self.data.train_masks, outlier_min_count)

    def test_counts(self) -> np.ndarray | None:
        masks = self.data.test_masks
        return None if masks is None else class_counts(masks)

    def n_groups(self) -> int | None:
        groups = self.data.train_groups
        return None if groups is None else len(set(groups))


class ShardSource(_Source):
    """A prepared shard folder; per-image flags as `prepare` stored them."""

    kind = "shards"

    @cached_property
    def info(self) -> dict:
        return shards.read_dataset(self.path)

    @cached_property
    def _train(self) -> dict[str, np.ndarray]:
        return shards.read_flags(self.path, "train", self.info)

    def split_info(self, split: str) -> dict:
        s = self.info["splits"][split]
        return {"count": s["count"], "labeled": s["labeled"]}

    def batches(self, split: str, batch_size: int, with_masks: bool) -> Iterator[tuple]:
        return shards.iter_batches(self.path, split, batch_size, with_masks, info=self.info)

    def check(self, split: str) -> None:
        """Every shard of ``split`` against its sha256 and image shape (`shards.check_shards`)."""
        shards.check_shards(self.path, split, self.info)

    def load_split(self, split: str) -> shards.Split:
        return shards.load_split(self.path, split, self.info)

    def train_flags(self, outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT) -> Flags:
        """Stored flags; `outlier_min_count` applies only if the folder did not record its own."""
        tr, cleaning = self._train, self.info["cleaning"]
        counts = tr["class_counts"].astype(np.int64)
        return Flags(counts, tr["bg_fraction"], tr["outlier"].astype(bool),
                     cleaning["duplicate_mask_groups"],
                     cleaning.get("uniform_duplicate_groups", []),
                     cleaning.get("outlier_min_count", outlier_min_count))

    def test_counts(self) -> np.ndarray | None:
        if not self.info["splits"]["test"]["labeled"]:
            return None
        te = shards.read_flags(self.path, "test", self.info)
        return te["class_counts"].astype(np.int64) if "class_counts" in te else None

    def n_groups(self) -> int | None:
        if not self.info["splits"]["train"].get("grouped"):
            return None
        return len(np.unique(self._train["groups"]))


Source = NpzSource | ShardSource


def open_data(data: Path | Source) -> Source:
    """The npz file or shard folder at `data` (a folder is read as shards, anything else as
    npz); an already opened source is returned as it is."""
    if isinstance(data, _Source):
        return data
    data = Path(data)
    return ShardSource(data) if data.is_dir() else NpzSource(data)


def as_batches(
    data: Path | Source, split: str, batch_size: int, with_masks: bool = False
) -> Iterator[tuple[np.ndarray, ...]]:
    """Stream (ids int64 (b,), images uint8 (b, 64, 128)[, masks]) from a shard folder or npz.

    A shard folder streams shard by shard (`shards.iter_batches`); an npz is read into memory.
    """
    shards.check_split(split)
    return open_data(data).batches(split, batch_size, with_masks)


def split_info(data: Path | Source, split: str) -> dict:
    """count and labeled for a split of a shard folder or npz, without loading images."""
    shards.check_split(split)
    return open_data(data).split_info(split)

