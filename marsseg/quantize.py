"""What int8 post-training quantization calibrates on: real images in the static shape.

`backends` converts a fold to OpenVINO IR and hands NNCF these batches. The images are
spread evenly over the train split (the test split when there is none) and read as a
stream; too few of them are repeated to fill the static batch, never padded with zero
images (which would skew the activation ranges), and a warning line gives the counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

CALIBRATION_IMAGES = 256


def calibration_images(data: str | os.PathLike, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """``n`` training images spread evenly over the train split of ``data`` (shard folder
    or npz); the test split when there is no train split. Shape: uint8 (n, H, W)."""
    from . import data as D

    for split in ("train", "test"):
        try:
            count = int(D.split_info(Path(data), split)["count"])
            want = set(np.unique(np.linspace(0, count - 1, min(n, count)).round()).astype(int))
            picked, at = [], 0
            for _, images in D.as_batches(Path(data), split, 1024):
                rows = [i - at for i in range(at, at + len(images)) if i in want]
                picked.append(images[rows])
                at += len(images)
        except (InputError, KeyError, OSError):
            continue
        if count:
            return np.concatenate(picked)
    raise InputError(f"{data}: no images to calibrate the int8 backend on")


def calib_batches(images: np.ndarray, batch: int, views: Sequence[tuple[int, ...]],
                  n: int) -> list[np.ndarray]:
    """Calibration inputs in the static shape (n = batch x views rows): groups of
    ``batch`` images, views stacked; fewer images than one batch are repeated to fill it."""
    if len(images) < batch:
        images = images[np.resize(np.arange(len(images)), batch)]
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float()
    out = []
    for s in range(0, len(x) - batch + 1, batch):
        c = x[s:s + batch]
        xx = torch.cat([c.flip(d) if d else c for d in views])
        out.append(xx[:n].contiguous().numpy())
    return out


def calibration_note(found: int, batch: int, wanted: int = CALIBRATION_IMAGES) -> str | None:
    """The warning line when int8 calibrates on fewer real images than it wants."""
    if found >= wanted:
        return None
    fill = f"; repeated to fill the static batch of {batch}" if found < batch else ""
    return (f"warning: int8 calibration on {found} real image(s), {wanted} wanted{fill}: "
            "its accuracy may suffer; calibrate on a larger train split")


def calibration(data: str | os.PathLike, batch: int, views: Sequence[tuple[int, ...]],
                n: int, warn: Callable[[str], None]) -> list[np.ndarray]:
    """The calibration batches for ``data``; ``warn`` gets the note when images are few."""
    images = calibration_images(data)
    note = calibration_note(len(images), batch)
    if note:
        warn(note)
    return calib_batches(images, batch, views, n)
