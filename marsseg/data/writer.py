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
    Flags,
    bg_fraction,
    bg_histogram,
    check_max_background,
    class_counts,
    clean_keep,
    flag_images,
)
from .npz import NpzData, load_npz


def prepare(
    src: Path,
    out_dir: Path,
    shard_size: int = 1024,
    force: bool = False,
    outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT,
    max_background: float = DEFAULT_MAX_BACKGROUND,
) -> dict:
    """Validate `src` (npz) and write HDF5 shards + dataset.json to `out_dir`; return the json.

    Built in a hidden temp folder beside `out_dir` and renamed into place; with `force` an
    old `out_dir` is replaced only after the new one is complete. Nothing is left at
    `out_dir` on failure. Flags (never drops) duplicate-mask outliers and stores each
    image's background fraction; `max_background` only sets the `train_clean` counts.
    """
    src, out_dir = Path(src), Path(out_dir)
    _check_options(out_dir, shard_size, outlier_min_count, max_background)
    _check_out_dir(out_dir, force)
    if out_dir.exists() and src.resolve().is_relative_to(out_dir.resolve()):
        raise InputError(f"{src}: is inside {out_dir}, which --force would replace")
    data = load_npz(src)
    flags = flag_images(data.train_masks, outlier_min_count)
    train, test = _train_arrays(data, flags), _test_arrays(data)
    check_space(out_dir, sum(a.nbytes for arrays in (train, test) for a in arrays.values()))
    with _new_folder(out_dir) as tmp:
        written = {"train": _write_split(tmp, "train", train, shard_size),
                   "test": _write_split(tmp, "test", test, shard_size)}
        info = _dataset_json(src, data, flags, test.get("class_counts"), written, max_background)
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


def _train_arrays(data: NpzData, flags: Flags) -> dict[str, np.ndarray]:
    """The train split's shard datasets, in the order they are written."""
    n = len(data.train_images)
    return {
        "images": data.train_images,
        "masks": data.train_masks,
        "ids": np.arange(n, dtype=np.int64),
        "groups": np.array(data.train_groups or [str(i) for i in range(n)], dtype=str),
        "bg_fraction": flags.bg_fraction,
        "outlier": flags.outlier.astype(np.uint8),
        "class_counts": flags.class_counts.astype(np.int32),
    }


def _test_arrays(data: NpzData) -> dict[str, np.ndarray]:
    """The test split's shard datasets (masks and their counts only when labeled)."""
    test = {"images": data.test_images, "ids": np.arange(len(data.test_images), dtype=np.int64)}
    if data.test_masks is not None:
        counts = class_counts(data.test_masks)
        test["masks"] = data.test_masks
        test["bg_fraction"] = bg_fraction(counts)
        test["class_counts"] = counts.astype(np.int32)
    if data.test_groups is not None:
        test["groups"] = np.array(data.test_groups, dtype=str)
    return test


def _write_split(
    tmp: Path, split: str, arrays: dict[str, np.ndarray], shard_size: int
) -> list[dict]:
    n = len(arrays["ids"])
    written = []
    for k, start in enumerate(range(0, n, shard_size)):
        name = shards.shard_name(split, k)
        shards.write_shard(
            tmp / name, split, {key: a[start : start + shard_size] for key, a in arrays.items()}
        )
        written.append(
            {"file": name, "count": min(shard_size, n - start), "sha256": sha256_file(tmp / name)}
        )
    return written


def _dataset_json(src: Path, data: NpzData, flags: Flags, test_counts: np.ndarray | None,
                  written: dict[str, list[dict]], max_background: float) -> dict:
    """The folder's dataset.json: source, splits and their shards, class counts, cleaning."""
    counts, bg = flags.class_counts, flags.bg_fraction
    keep = clean_keep(flags.outlier, bg, max_background)
    splits = {}
    for split, labeled in (("train", True), ("test", data.test_masks is not None)):
        images, _, groups = data.arrays(split)
        splits[split] = {"count": len(images), "labeled": labeled,
                         "grouped": groups is not None, "shards": written[split]}
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
