"""Checked batch streams off a shard folder or an npz, for prediction and scoring.

``stream_batches`` reads ``source.as_batches`` (fixed-size batches, independent of
shard sizes, so results do not depend on the shard layout), passes it through
``guard_reads`` (a read error of a shard becomes one InputError line) and
``checked_batches`` (image shape and dtype, mask shape, increasing ids).
``count_images`` (with ``shards.check_shards``) runs before any prediction work starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .. import IMAGE_SHAPE
from ..errors import InputError
from .shards import check_shards, read_dataset
from .source import as_batches, split_info


def check_images(images: np.ndarray, where: str) -> np.ndarray:
    """``images`` if uint8 (b, 64, 128), else an InputError naming ``where``."""
    if images.ndim != 3 or tuple(images.shape[1:]) != tuple(IMAGE_SHAPE):
        raise InputError(f"{where}: images have shape {tuple(images.shape[1:])}, "
                         f"expected {tuple(IMAGE_SHAPE)}")
    if images.dtype != np.uint8:
        raise InputError(f"{where}: images must be uint8, got {images.dtype}")
    return images


def checked_batches(stream: Iterable[tuple], where: str) -> Iterator[tuple]:
    """Pass (ids, images[, masks]) batches on, checked: image shape and dtype, masks shaped
    like the images, ids increasing across batches. Empty batches are dropped."""
    last = None
    for ids, images, *masks in stream:
        ids = np.asarray(ids, dtype=np.int64)
        images = check_images(np.asarray(images), where)
        if masks and np.shape(masks[0]) != np.shape(images):
            raise InputError(f"{where}: masks have shape {np.shape(masks[0])}, images "
                             f"{np.shape(images)} (rows, height, width)")
        if len(ids) == 0:
            continue
        if np.any(np.diff(ids) <= 0) or (last is not None and ids[0] <= last):
            raise InputError(f"{where}: image ids are not in increasing order")
        last = int(ids[-1])
        yield (ids, images, *(np.asarray(m) for m in masks))


def guard_reads(stream, where, what: str) -> Iterator:
    """Pass ``stream`` through; a read error of a shard (truncated HDF5, missing key ...)
    becomes one InputError line naming ``where`` and ``what`` was being read."""
    it = iter(stream)
    while True:
        try:
            piece = next(it)
        except StopIteration:
            return
        except InputError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{where}: cannot read {what} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        yield piece


def stream_batches(data: str | os.PathLike, split: str, batch_size: int,
                   with_masks: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
    """Checked (ids, images[, masks]) batches of ``batch_size`` from a shard folder or npz
    (masks also label-checked); read errors of a shard (truncated HDF5 ...) become InputError."""
    what = "labeled images" if with_masks else f"{split} images"
    batches = guard_reads(as_batches(Path(data), split, batch_size, with_masks=with_masks),
                          data, what)
    return checked_batches(batches, str(data))


def prescan(data: str | os.PathLike, split: str, batch_size: int, with_masks: bool = False
            ) -> np.ndarray:
    """Read ``split`` once through every check of ``stream_batches`` without predicting;
    returns its ids. Runs before work that leaves traces (a backend conversion cached in
    the run folder, its progress line), so bad data still fails with one line and
    nothing written."""
    ids = [b[0] for b in stream_batches(data, split, batch_size, with_masks)]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def count_images(data: str | os.PathLike, split: str = "test") -> int:
    """Number of images of ``split`` in a shard folder or an npz (checks the image shape)."""
    data = Path(data)
    if not data.exists():
        raise InputError(f"{data}: data path does not exist")
    if data.is_dir():
        shape = read_dataset(data).get("image_shape")
        if shape is not None and tuple(shape) != tuple(IMAGE_SHAPE):
            raise InputError(f"{data / 'dataset.json'}: image_shape {tuple(shape)}, "
                             f"expected {tuple(IMAGE_SHAPE)}")
        check_shards(data, split)
    return int(split_info(data, split)["count"])
