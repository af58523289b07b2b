"""Input data: the course npz, cleaning flags, the shard folder, and reading either.

Flow: `load_npz` validates the course layout -> `prepare` writes `train-000.h5`...,
`test-000.h5`... and `dataset.json` into a temp folder and renames it into place ->
`load_split` / `iter_batches` read it back; `as_batches` / `split_info` / `describe`
take either an npz or a shard folder.

    npz.py       the course npz: file checks, keys, shapes, value ranges (`load_npz`)
    cleaning.py  per-image class counts, background fraction, duplicate-mask outliers
    shards.py    the shard folder format: write one shard, read dataset.json and splits
    writer.py    `prepare`: npz -> shard folder, all or nothing
    source.py    npz or shard folder? (`open_data`), `as_batches`, `split_info`
    stream.py    checked batch streams for prediction and scoring (`stream_batches`, `count_images`)
    loaders.py   torch DataLoaders over in-memory uint8 arrays (what a training fold iterates)
    summary.py   `describe` (what `marsseg-cli inspect` prints)

A leaf package: it imports nothing of marsseg but the package root, `errors` and `_io`.
"""

from __future__ import annotations

from .cleaning import class_counts, duplicate_mask_groups
from .npz import load_npz
from .shards import (
    Split,
    check_shards,
    iter_batches,
    load_split,
    pinned,
    read_dataset,
    reads_data,
    shard_paths,
    verify_shards,
)
from .source import as_batches, open_data, split_info
from .stream import count_images, prescan, stream_batches
from .summary import describe
from .writer import prepare

__all__ = [
    "Split", "as_batches", "check_shards", "class_counts", "count_images", "describe",
    "duplicate_mask_groups", "iter_batches", "load_npz", "load_split", "open_data", "pinned",
    "prepare", "prescan", "reads_data", "read_dataset", "shard_paths", "split_info", "stream_batches", "verify_shards",
]
