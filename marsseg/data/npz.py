"""The course npz: check the file and its keys, then stream its rows (`NpzReader`).

Keys: `training_set` (N, 2, 64, 128) image/mask, `test_set` (M, 64, 128), optional
`test_masks` (M, 64, 128), optional `training_source` / `test_source` (group = text
before '#'). Every problem is an InputError naming the file, the key and the value.

Members are never loaded whole: the .npy header inside the zip member gives shape and
dtype, and rows are read in chunks through the member's stream (stored or deflated), so
memory does not grow with the file. `load_npz` reads everything for small files and tests.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import IMAGE_SHAPE, NUM_CLASSES
from ..errors import InputError

#: bytes of one chunk of rows read from a member (a few MB: memory stays flat)
CHUNK_BYTES = 8 << 20
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


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


def _whole_numbers(a: np.ndarray, path: Path, key: str, lo: int, hi: int, what: str,
                   first_row: int = 0) -> np.ndarray:
    """Check the range of a chunk whose rows start at `first_row`; return uint8. Floats
    must hold whole numbers. (The dtype was checked from the header: `_check_dtype`.)"""
    if a.size == 0:
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            i = first_row + int(np.argwhere(~finite)[0][0])
            raise InputError(f"{path}: '{key}' has NaN or infinite values (first in row {i})")
        frac = a != np.round(a)
        if frac.any():
            idx = tuple(np.argwhere(frac)[0])
            raise InputError(f"{path}: '{key}' has non-integer {what} values, e.g. "
                             f"{float(a[idx])} in row {first_row + idx[0]}")
    bad = (a < lo) | (a > hi)
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        v = a[idx]
        v = int(v) if a.dtype.kind != "f" or float(v).is_integer() else float(v)
        raise InputError(f"{path}: '{key}' has {what} value {v} in row {first_row + idx[0]}; "
                         f"{what}s must be {lo}..{hi}")
    return a.astype(np.uint8, copy=False)


def _check_dtype(dtype: np.dtype, path: Path, key: str, lo: int, hi: int) -> None:
    if dtype.kind == "b":  # True/False is neither a pixel nor a label: a wrong array
        raise InputError(f"{path}: '{key}' has dtype bool, expected whole numbers {lo}..{hi}")
    if dtype.kind not in "uif":
        raise InputError(f"{path}: '{key}' has dtype {dtype}, expected numbers")


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


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


@dataclass(frozen=True)
class _Member:
    """One .npy member of the archive: its header, and where its data starts."""

    name: str  # the zip member (key + ".npy")
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    data_offset: int  # bytes of magic + header before the data


def _read_header(zf: zipfile.ZipFile, path: Path, key: str) -> _Member:
    from numpy.lib import format as npf

    name = key + ".npy"
    try:
        with zf.open(name) as f:
            version = npf.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npf.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npf.read_array_header_2_0(f)
            else:  # 3.0 (utf-8 field names) has no public reader
                shape, fortran, dtype = npf._read_array_header(f, version)
            offset = f.tell()
    except _READ_ERRORS as e:
        raise InputError(f"{path}: key '{key}' is not a readable .npy array ({e})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:  # object arrays need pickle; we never unpickle user files
        raise InputError(f"{path}: key '{key}' cannot be read without pickle (object array)")
    need = offset + int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    have = zf.getinfo(name).file_size
    if have < need:  # e.g. a header claiming 10^9 rows: refuse before reading a byte
        raise InputError(f"{path}: key '{key}' is truncated or corrupt: its header claims shape "
                         f"{_shape_str(shape)} ({need:,} bytes), the member holds {have:,}")
    return _Member(name, tuple(int(s) for s in shape), dtype, bool(fortran), offset)


class NpzReader:
    """A course npz with its keys, shapes and dtypes checked (headers only, no data read).

    `chunks(split)` streams validated uint8 rows; `groups(split)` the group keys.
    Use as a context manager or call `close()`.
    """

    def __init__(self, path: Path):
        self.path = path = check_file(path)
        try:
            self._zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable npz file ({e})") from None
        try:
            self._members = self._check_headers()
        except BaseException:
            self._zf.close()
            raise

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zf.close()

    @property
    def keys(self) -> list[str]:
        return [n[:-4] for n in self._zf.namelist() if n.endswith(".npy")]

    def _check_headers(self) -> dict[str, _Member]:
        path, keys = self.path, self.keys
        for key in ("training_set", "test_set"):
            if key not in keys:
                found = ", ".join(sorted(keys)) or "nothing"
                raise InputError(f"{path}: missing key '{key}' (found: {found})")
        h, w = IMAGE_SHAPE
        tr = _read_header(self._zf, path, "training_set")
        if len(tr.shape) != 4 or tr.shape[1:] != (2, h, w):
            raise InputError(f"{path}: 'training_set' has shape {_shape_str(tr.shape)}, "
                             f"expected (N, 2, {h}, {w})")
        if tr.shape[0] == 0:
            raise InputError(f"{path}: 'training_set' holds no images")
        te = _read_header(self._zf, path, "test_set")
        if len(te.shape) != 3 or te.shape[1:] != (h, w):
            raise InputError(f"{path}: 'test_set' has shape {_shape_str(te.shape)}, "
                             f"expected (M, {h}, {w})")
        if te.shape[0] == 0:
            raise InputError(f"{path}: 'test_set' holds no images")
        members = {"training_set": tr, "test_set": te}
        if "test_masks" in keys:
            tm = members["test_masks"] = _read_header(self._zf, path, "test_masks")
            if tm.shape != te.shape:
                raise InputError(f"{path}: 'test_masks' has shape {_shape_str(tm.shape)}, "
                                 f"expected {_shape_str(te.shape)} like 'test_set'")
        for key in ("training_source", "test_source"):
            if key in keys:
                members[key] = _read_header(self._zf, path, key)
        self._members = members
        self._groups = {"train": self._read_groups(members, "training_source", tr.shape[0]),
                        "test": self._read_groups(members, "test_source", te.shape[0])}
        _check_dtype(tr.dtype, path, "training_set", 0, 255)
        _check_dtype(te.dtype, path, "test_set", 0, 255)
        if "test_masks" in members:
            _check_dtype(members["test_masks"].dtype, path, "test_masks", 0, NUM_CLASSES - 1)
        return members

    def _read_groups(self, members, key: str, n: int) -> list[str] | None:
        m = members.get(key)
        if m is None:
            return None
        if len(m.shape) != 1 or m.shape[0] != n:
            raise InputError(f"{self.path}: '{key}' has shape {_shape_str(m.shape)}, expected ({n},)")
        if n == 0:
            return []
        if m.dtype.kind not in "USiu":
            raise InputError(f"{self.path}: '{key}' has dtype {m.dtype}, expected strings")
        g = np.concatenate(list(self._rows(key, self._step([key], CHUNK_BYTES))))
        if g.dtype.kind == "S":
            g = np.char.decode(g, "utf-8", errors="replace")
        return [group_of(s) for s in g.tolist()]

    def count(self, split: str) -> int:
        return self._members["training_set" if split == "train" else "test_set"].shape[0]

    def labeled(self, split: str) -> bool:
        return split == "train" or "test_masks" in self._members

    def groups(self, split: str) -> list[str] | None:
        return self._groups[split]

    def _step(self, keys, chunk_bytes: int) -> int:
        """Rows per chunk: about ``chunk_bytes`` of the widest of ``keys``' rows."""
        widest = max(int(np.prod(self._members[k].shape[1:], dtype=np.int64))
                     * self._members[k].dtype.itemsize for k in keys)
        return max(1, chunk_bytes // max(widest, 1))

    def _rows(self, key: str, step: int) -> Iterator[np.ndarray]:
        """The raw rows of member ``key``, ``step`` rows at a time."""
        m = self._members[key]
        n, row_shape = m.shape[0], m.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * m.dtype.itemsize
        try:
            with self._zf.open(m.name) as f:
                if m.fortran:  # rows are not contiguous: only a whole read gives them
                    f.seek(m.data_offset)
                    whole = np.frombuffer(f.read(n * row_bytes), m.dtype)
                    a = whole.reshape(m.shape[::-1]).transpose()
                    for s in range(0, n, step):
                        yield np.ascontiguousarray(a[s:s + step])
                    return
                f.seek(m.data_offset)
                for s in range(0, n, step):
                    k = min(step, n - s)
                    buf = f.read(k * row_bytes)
                    if len(buf) != k * row_bytes:
                        raise EOFError(f"data ends at row {s + len(buf) // max(row_bytes, 1)} of {n}")
                    yield np.frombuffer(buf, m.dtype).reshape(k, *row_shape)
        except InputError:
            raise
        except _READ_ERRORS as e:
            raise InputError(f"{self.path}: key '{key}' is truncated or corrupt ({e})") from None

    def chunks(self, split: str, with_masks: bool = True,
               chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple]:
        """Validated (first_row, images uint8 (k, 64, 128)[, masks uint8 (k, 64, 128)]) of
        ``split``, in row order. Floats must hold whole numbers in range."""
        p, last = self.path, NUM_CLASSES - 1
        if split == "train":
            s = 0
            for c in self._rows("training_set", self._step(["training_set"], chunk_bytes)):
                images = _whole_numbers(c[:, 0], p, "training_set", 0, 255, "pixel", s)
                item = (s, np.ascontiguousarray(images))
                if with_masks:
                    masks = _whole_numbers(c[:, 1], p, "training_set", 0, last, "label", s)
                    item += (np.ascontiguousarray(masks),)
                yield item
                s += len(c)
            return
        if with_masks and "test_masks" not in self._members:
            raise InputError(f"{p}: split 'test' has no masks (no 'test_masks' key)")
        keys = ["test_set", "test_masks"] if with_masks else ["test_set"]
        step = self._step(keys, chunk_bytes)
        images = self._rows("test_set", step)
        masks = self._rows("test_masks", step) if with_masks else None
        s = 0
        for c in images:
            item = (s, np.ascontiguousarray(_whole_numbers(c, p, "test_set", 0, 255, "pixel", s)))
            if masks is not None:
                m = next(masks)
                item += (np.ascontiguousarray(_whole_numbers(m, p, "test_masks", 0, last,
                                                             "label", s)),)
            yield item
            s += len(c)

    def validate(self) -> None:
        """Read every image and mask once through the checks (no rows kept)."""
        for split in ("train", "test"):
            for _ in self.chunks(split, with_masks=self.labeled(split)):
                pass


def load_npz(path: Path) -> NpzData:
    """Read and validate a whole course-layout npz into memory (small files; `NpzReader`
    streams). Raises InputError naming file, key and problem."""
    with NpzReader(path) as r:
        parts = {}
        for split in ("train", "test"):
            got = list(r.chunks(split, with_masks=r.labeled(split)))
            parts[split] = [np.concatenate([c[j] for c in got]) for j in range(1, len(got[0]))]
        return NpzData(
            path=r.path, train_images=parts["train"][0], train_masks=parts["train"][1],
            test_images=parts["test"][0],
            test_masks=parts["test"][1] if len(parts["test"]) > 1 else None,
            train_groups=r.groups("train"), test_groups=r.groups("test"))
