"""Data given on the command line: a course npz or a prepared shard folder, read alike.

`open_data` is the one place that tells the two apart; `as_batches`, `split_info` and
`describe` ask the object it returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import shards
from .cleaning import DEFAULT_OUTLIER_MIN_COUNT, FlagBuilder, Flags, class_counts
from .npz import NpzReader
from .shards import rebatch


class _Source:
    kind: str

    def __init__(self, path: Path):
        self.path = path


class NpzSource(_Source):
    """An npz, its headers checked on first use and its rows streamed (`NpzReader`)."""

    kind = "npz"

    @cached_property
    def reader(self) -> NpzReader:
        # The zip stays open for the source's life: streams reopen members from it.
        return NpzReader(self.path)

    def split_info(self, split: str) -> dict:
        return {"count": self.reader.count(split), "labeled": self.reader.labeled(split)}

    def batches(self, split: str, batch_size: int, with_masks: bool) -> Iterator[tuple]:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1 (got {batch_size})")
        reader = self.reader
        if with_masks and not reader.labeled(split):
            raise InputError(f"{self.path}: split '{split}' has no masks (no 'test_masks' key)")

        def gen():
            for s, images, *masks in reader.chunks(split, with_masks=with_masks):
                yield (np.arange(s, s + len(images), dtype=np.int64), images, *masks)

        return rebatch(gen(), batch_size)

    def _flags(self, split: str, outlier_min_count: int) -> Flags:
        b = FlagBuilder(outlier_min_count)
        for _, _, masks in self.reader.chunks(split, with_masks=True):
            b.add(masks)
        return b.flags()

    def train_flags(self, outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT) -> Flags:
        return self._flags("train", outlier_min_count)

    def test_counts(self) -> np.ndarray | None:
        if not self.reader.labeled("test"):
            return None
        counts = [class_counts(m) for _, _, m in self.reader.chunks("test", with_masks=True)]
        return np.concatenate(counts)

    def n_groups(self) -> int | None:
        groups = self.reader.groups("train")
        return None if groups is None else len(set(groups))


class ShardSource(_Source):
    """A prepared shard folder; per-image flags as `prepare` stored them."""

    kind = "shards"

    @cached_property
    def info(self) -> dict:
        return shards.read_dataset(self.path)

    @cached_property
    def _train(self) -> dict[str, np.ndarray]:
        return shards.read_flags(self.path, "train")

    def split_info(self, split: str) -> dict:
        s = self.info["splits"][split]
        return {"count": s["count"], "labeled": s["labeled"]}

    def batches(self, split: str, batch_size: int, with_masks: bool) -> Iterator[tuple]:
        return shards.iter_batches(self.path, split, batch_size, with_masks)

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
        te = shards.read_flags(self.path, "test")
        return te["class_counts"].astype(np.int64) if "class_counts" in te else None

    def n_groups(self) -> int | None:
        if not self.info["splits"]["train"].get("grouped"):
            return None
        return len(np.unique(self._train["groups"]))


def open_data(data: Path) -> NpzSource | ShardSource:
    """The npz file or shard folder at `data` (a folder is read as shards, anything else as npz)."""
    data = Path(data)
    return ShardSource(data) if data.is_dir() else NpzSource(data)


def as_batches(
    data: Path, split: str, batch_size: int, with_masks: bool = False
) -> Iterator[tuple[np.ndarray, ...]]:
    """Stream (ids int64 (b,), images uint8 (b, 64, 128)[, masks]) from a shard folder or npz.

    A shard folder streams shard by shard (`shards.iter_batches`), an npz member by member
    in chunks (`NpzReader`): memory does not grow with the data.
    """
    shards.check_split(split)
    return open_data(data).batches(split, batch_size, with_masks)


def split_info(data: Path, split: str) -> dict:
    """count and labeled for a split of a shard folder or npz, without loading images."""
    shards.check_split(split)
    return open_data(data).split_info(split)

