"""`prepare`: validate a course npz and write it as a shard folder, all or nothing.

Preparing never drops a sample: it flags duplicate-mask outliers and stores each image's
background fraction (cleaning.py), and recipes choose what to skip.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import CLASS_NAMES, IMAGE_SHAPE
from .._io import atomic_path, check_space, sha256_file
from ..errors import InputError
from . import shards
from .cleaning import (
    DEFAULT_MAX_BACKGROUND,
    DEFAULT_OUTLIER_MIN_COUNT,
    HIST_EDGES,
    FlagBuilder,
    Flags,
    bg_fraction,
    bg_histogram,
    check_max_background,
    class_counts,
    clean_keep,
)
from .npz import NpzReader
from .shards import rebatch


def prepare(
    src: Path,
    out_dir: Path,
    shard_size: int = 1024,
    force: bool = False,
    outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT,
    max_background: float = DEFAULT_MAX_BACKGROUND,
) -> dict:
    """Validate `src` (npz) and write HDF5 shards + dataset.json to `out_dir`; return the json.

    The npz is streamed twice (check, then write): memory holds one shard, not the file.
    Built in a hidden temp folder beside `out_dir` and renamed into place; with `force` an
    old `out_dir` is replaced only after the new one is complete, and not while another
    command reads it (refused). A symlink `out_dir` stays: the folder it names is replaced. Nothing is left at
    `out_dir` on failure. Flags (never drops) duplicate-mask outliers and stores each
    image's background fraction; `max_background` only sets the `train_clean` counts.
    """
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.is_symlink():  # write into the folder the link names; the link stays
        out_dir = out_dir.resolve()
    _check_options(out_dir, shard_size, outlier_min_count, max_background)
    _check_out_dir(out_dir, force)
    if out_dir.exists() and src.resolve().is_relative_to(out_dir.resolve()):
        raise InputError(f"{src}: is inside {out_dir}, which --force would replace")
    # A folder a running command reads is pinned (shards.pinned): refuse to swap it.
    held = shards.replacing(out_dir) if out_dir.is_dir() else contextlib.nullcontext()
    with held, NpzReader(src) as data:
        # Pass 1 checks every value and gathers the flags; pass 2 writes: bad data leaves
        # nothing, and only one shard's rows are in memory at a time.
        flags = _train_flags(data, outlier_min_count)
        test_counts = _test_counts(data)
        check_space(out_dir, _shard_bytes(data))
        with _new_folder(out_dir) as tmp:
            written = {"train": _write_split(tmp, "train", _train_shards(data, flags, shard_size)),
                       "test": _write_split(tmp, "test",
                                            _test_shards(data, test_counts, shard_size))}
            info = _dataset_json(src, data, flags, test_counts, written, max_background)
            with open(tmp / shards.DATASET_JSON, "w") as f:
                json.dump(info, f, indent=1)
    return info


def _check_options(out_dir: Path, shard_size: int, outlier_min_count: int,
                   max_background: float) -> None:
    if shard_size < 1:
        raise InputError(f"{out_dir}: --shard-size must be at least 1 (got {shard_size})")
    if outlier_min_count < 2:
        raise InputError(
            f"{out_dir}: --outlier-min-count must be at least 2 (got {outlier_min_count})"
        )
    check_max_background(max_background, str(out_dir))


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise InputError(f"{out_dir}: already exists (use --force to replace it)")
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: exists and is not a directory; not replacing it")
        # Refuse to wipe a folder that is not ours (e.g. `prepare x.npz ~ --force`).
        if any(out_dir.iterdir()) and not (out_dir / shards.DATASET_JSON).exists():
            raise InputError(
                f"{out_dir}: exists, is not empty and has no dataset.json; not replacing it"
            )


def _shard_bytes(data: NpzReader) -> int:
    """About the bytes the shard folder takes: images and masks, plus the per-image flags."""
    pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    return sum(data.count(split) * ((2 if data.labeled(split) else 1) * pixels + 64)
               for split in ("train", "test"))


def _train_flags(data: NpzReader, outlier_min_count: int) -> Flags:
    b = FlagBuilder(outlier_min_count)
    for _, _, masks in data.chunks("train"):
        b.add(masks)
    return b.flags()


def _test_counts(data: NpzReader) -> np.ndarray | None:
    """Class counts of the test masks (None when unlabeled); checks the test images too."""
    counts = [class_counts(c[2]) if len(c) > 2 else None
              for c in data.chunks("test", with_masks=data.labeled("test"))]
    return np.concatenate(counts) if data.labeled("test") else None


def _shard_rows(data: NpzReader, split: str, shard_size: int) -> Iterator[tuple]:
    """(first row, images[, masks]) of each shard: the stream regrouped to ``shard_size``."""
    chunks = data.chunks(split, with_masks=data.labeled(split))
    rows = ((np.arange(s, s + len(c[0]), dtype=np.int64), *c) for s, *c in chunks)
    for ids, *arrays in rebatch(rows, shard_size):
        yield int(ids[0]), *arrays


def _train_shards(data: NpzReader, flags: Flags, shard_size: int) -> Iterator[dict]:
    """The train split's shard datasets, shard by shard, in the order they are written."""
    groups = data.groups("train")
    for s, images, masks in _shard_rows(data, "train", shard_size):
        e = s + len(images)
        yield {
            "images": images,
            "masks": masks,
            "ids": np.arange(s, e, dtype=np.int64),
            "groups": np.array(groups[s:e] if groups else [str(i) for i in range(s, e)],
                               dtype=str),
            "bg_fraction": flags.bg_fraction[s:e],
            "outlier": flags.outlier[s:e].astype(np.uint8),
            "class_counts": flags.class_counts[s:e].astype(np.int32),
        }


def _test_shards(data: NpzReader, counts: np.ndarray | None, shard_size: int
                 ) -> Iterator[dict]:
    """The test split's shard datasets (masks and their counts only when labeled)."""
    groups = data.groups("test")
    for s, images, *masks in _shard_rows(data, "test", shard_size):
        e = s + len(images)
        test = {"images": images, "ids": np.arange(s, e, dtype=np.int64)}
        if counts is not None:
            test["masks"] = masks[0]
            test["bg_fraction"] = bg_fraction(counts[s:e])
            test["class_counts"] = counts[s:e].astype(np.int32)
        if groups is not None:
            test["groups"] = np.array(groups[s:e], dtype=str)
        yield test


def _write_split(tmp: Path, split: str, shard_arrays: Iterator[dict]) -> list[dict]:
    written = []
    for k, arrays in enumerate(shard_arrays):
        name = shards.shard_name(split, k)
        shards.write_shard(tmp / name, split, arrays)
        written.append(
            {"file": name, "count": len(arrays["ids"]), "sha256": sha256_file(tmp / name)}
        )
    return written


def _dataset_json(src: Path, data: NpzReader, flags: Flags, test_counts: np.ndarray | None,
                  written: dict[str, list[dict]], max_background: float) -> dict:
    """The folder's dataset.json: source, splits and their shards, class counts, cleaning."""
    counts, bg = flags.class_counts, flags.bg_fraction
    keep = clean_keep(flags.outlier, bg, max_background)
    splits = {}
    for split in ("train", "test"):
        splits[split] = {"count": data.count(split), "labeled": data.labeled(split),
                         "grouped": data.groups(split) is not None, "shards": written[split]}
    return {
        "format_version": shards.FORMAT_VERSION,
        "source": {"path": str(src.resolve()), "sha256": sha256_file(src)},
        "image_shape": list(IMAGE_SHAPE),
        "class_names": list(CLASS_NAMES),
        "splits": splits,
        "class_pixel_counts": {
            "train": counts.sum(0).tolist(),
            "train_clean": counts[keep].sum(0).tolist(),
            "test": None if test_counts is None else test_counts.sum(0).tolist(),
        },
        "cleaning": {
            "outlier_min_count": flags.outlier_min_count,
            "duplicate_mask_groups": flags.outlier_groups,
            "uniform_duplicate_groups": flags.uniform_groups,
            "outlier_ids": np.flatnonzero(flags.outlier).tolist(),
            "max_background": max_background,
            "high_background_count": int((bg > max_background).sum()),
            "train_clean_count": int(keep.sum()),
            "bg_fraction_histogram": {
                "edges": HIST_EDGES,
                "train": bg_histogram(bg),
                "test": None if test_counts is None else bg_histogram(bg_fraction(test_counts)),
            },
        },
    }


@contextlib.contextmanager
def _new_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder that replaces `out_dir` only once it is whole (`atomic_path`)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir, hidden=True) as tmp:
            tmp.mkdir()
            yield tmp
    except OSError as e:  # disk full, permissions, a file where a folder should be
        raise InputError(f"{out_dir}: cannot write the shard folder ({e})") from None
