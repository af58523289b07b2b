"""The course npz: check the file, read and validate its keys (`load_npz`).

Keys: `training_set` (N, 2, 64, 128) image/mask, `test_set` (M, 64, 128), optional
`test_masks` (M, 64, 128), optional `training_source` / `test_source` (group = text
before '#'). Every problem is an InputError naming the file, the key and the value.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import IMAGE_SHAPE, NUM_CLASSES
from ..errors import InputError


@dataclass
class NpzData:
    """A validated input file. Images and masks uint8 (n, 64, 128); groups per row or None."""

    path: Path
    train_images: np.ndarray
    train_masks: np.ndarray
    test_images: np.ndarray
    test_masks: np.ndarray | None
    train_groups: list[str] | None
    test_groups: list[str] | None

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
        """(images, masks or None, groups or None) of the 'train' or 'test' split."""
        if split == "train":
            return self.train_images, self.train_masks, self.train_groups
        return self.test_images, self.test_masks, self.test_groups


def group_of(source: str) -> str:
    """Group key of a `training_source` entry: the text before '#' (the band suffix)."""
    return str(source).split("#", 1)[0]


def _read_member(z: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:  # object arrays need pickle; we never unpickle user files
        raise InputError(f"{path}: key '{key}' cannot be read without pickle ({e})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise InputError(f"{path}: key '{key}' is truncated or corrupt ({e})") from None


def _whole_numbers(a: np.ndarray, path: Path, key: str, lo: int, hi: int, what: str) -> np.ndarray:
    """Check dtype and range; return uint8. Floats must hold whole numbers."""
    if a.dtype.kind == "b":  # True/False is neither a pixel nor a label: a wrong array
        raise InputError(f"{path}: '{key}' has dtype bool, expected whole numbers {lo}..{hi}")
    if a.dtype.kind not in "uif":
        raise InputError(f"{path}: '{key}' has dtype {a.dtype}, expected numbers")
    if a.size == 0:
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            i = int(np.argwhere(~finite)[0][0])
            n = int((~finite).sum())
            raise InputError(f"{path}: '{key}' has {n} NaN or infinite values (first in row {i})")
        frac = a != np.round(a)
        if frac.any():
            idx = tuple(np.argwhere(frac)[0])
            raise InputError(
                f"{path}: '{key}' has non-integer {what} values, e.g. {float(a[idx])} in row {idx[0]}"
            )
    bad = (a < lo) | (a > hi)
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        v = a[idx]
        v = int(v) if a.dtype.kind != "f" or float(v).is_integer() else float(v)
        raise InputError(
            f"{path}: '{key}' has {what} value {v} in row {idx[0]}; {what}s must be {lo}..{hi}"
        )
    return a.astype(np.uint8, copy=False)


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _groups(z, path: Path, key: str, n: int) -> list[str] | None:
    if key not in z.files:
        return None
    g = _read_member(z, path, key)
    if g.ndim != 1 or len(g) != n:
        raise InputError(f"{path}: '{key}' has shape {_shape_str(g.shape)}, expected ({n},)")
    if n == 0:
        return []
    if g.dtype.kind not in "USiu":
        raise InputError(f"{path}: '{key}' has dtype {g.dtype}, expected strings")
    if g.dtype.kind == "S":
        g = np.char.decode(g, "utf-8", errors="replace")
    return [group_of(s) for s in g.tolist()]


def check_file(path: Path) -> Path:
    """Common checks for an input path: exists, is a file, is a zip (npz) archive."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if head == b"\x93NUMPY":
        raise InputError(f"{path}: is a single .npy array, not an .npz archive")
    if not zipfile.is_zipfile(path):
        if head[:4] == b"PK\x03\x04":
            raise InputError(f"{path}: truncated or corrupt npz (zip directory missing)")
        raise InputError(f"{path}: not an npz file (not a zip archive)")
    return path


def load_npz(path: Path) -> NpzData:
    """Read and validate a course-layout npz. Raises InputError naming file, key and problem.

    Keys: `training_set` (N, 2, 64, 128) image/mask, `test_set` (M, 64, 128), optional
    `test_masks` (M, 64, 128), optional `training_source` / `test_source` (str, group =
    text before '#'). Values may be stored as floats if they are whole numbers.
    """
    path = check_file(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable npz file ({e})") from None
    with z:
        for key in ("training_set", "test_set"):
            if key not in z.files:
                found = ", ".join(sorted(z.files)) or "nothing"
                raise InputError(f"{path}: missing key '{key}' (found: {found})")
        tr = _read_member(z, path, "training_set")
        h, w = IMAGE_SHAPE
        if tr.ndim != 4 or tr.shape[1:] != (2, h, w):
            raise InputError(
                f"{path}: 'training_set' has shape {_shape_str(tr.shape)}, expected (N, 2, {h}, {w})"
            )
        if tr.shape[0] == 0:
            raise InputError(f"{path}: 'training_set' holds no images")
        te = _read_member(z, path, "test_set")
        if te.ndim != 3 or te.shape[1:] != (h, w):
            raise InputError(
                f"{path}: 'test_set' has shape {_shape_str(te.shape)}, expected (M, {h}, {w})"
            )
        if te.shape[0] == 0:
            raise InputError(f"{path}: 'test_set' holds no images")
        tm = None
        if "test_masks" in z.files:
            tm = _read_member(z, path, "test_masks")
            if tm.shape != te.shape:
                raise InputError(
                    f"{path}: 'test_masks' has shape {_shape_str(tm.shape)}, "
                    f"expected {_shape_str(te.shape)} like 'test_set'"
                )
        train_groups = _groups(z, path, "training_source", tr.shape[0])
        test_groups = _groups(z, path, "test_source", te.shape[0])
    # Validate images and masks separately so the message says which one is wrong.
    train_images = _whole_numbers(tr[:, 0], path, "training_set", 0, 255, "pixel")
    train_masks = _whole_numbers(tr[:, 1], path, "training_set", 0, NUM_CLASSES - 1, "label")
    test_images = _whole_numbers(te, path, "test_set", 0, 255, "pixel")
    if tm is not None:
        tm = _whole_numbers(tm, path, "test_masks", 0, NUM_CLASSES - 1, "label")
    return NpzData(
        path=path,
        train_images=np.ascontiguousarray(train_images),
        train_masks=np.ascontiguousarray(train_masks),
        test_images=np.ascontiguousarray(test_images),
        test_masks=None if tm is None else np.ascontiguousarray(tm),
        train_groups=train_groups,
        test_groups=test_groups,
    )
