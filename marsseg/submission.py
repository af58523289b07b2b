"""The submission CSV: a fast numpy writer, a validator and a reader.

Layout (the course format): header ``id,0,1,...,8191``; one row per test image
in ascending id order; each mask flattened row-major (64x128) as integer labels
0..4. Labels are single digits, so a mask row is a fixed-width byte pattern
``d,d,...,d\\n`` that numpy fills in place — no per-value formatting, no pandas.

Writes are atomic: bytes go to ``<name>.tmp-<pid>`` beside the target, the
file is read back and validated, and only then renamed. Any exception
(including Ctrl-C) removes the temporary file, so no half CSV is ever left.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import IMAGE_SHAPE, NUM_CLASSES
from ._io import atomic_path
from .errors import InputError

_ZERO = ord("0")
_COMMA = ord(",")
_NL = ord("\n")


def header(num_pixels: int = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]) -> bytes:
    """The header line ``id,0,1,...,num_pixels-1\\n`` as bytes."""
    return ("id," + ",".join(map(str, range(num_pixels))) + "\n").encode()


def check_out_path(path: str | os.PathLike) -> Path:
    """Fail early (before any prediction work) if ``path`` cannot be written."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise InputError(f"{path}: output path is a directory")
    if not path.parent.is_dir():
        raise InputError(f"{path}: output directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{path}: output directory {path.parent} is not writable")
    return path


def format_rows(ids: np.ndarray, masks: np.ndarray) -> bytes:
    """CSV bytes for a batch of rows.

    Shape: ids int (n,), masks integer (n, H, W) with values 0..4. Returns the
    ``n`` lines ``id,v0,v1,...\\n`` (no header).
    """
    ids = np.asarray(ids)
    masks = np.asarray(masks)
    if masks.ndim != 3 or ids.shape != (masks.shape[0],):
        raise ValueError(f"masks must be (n,H,W) with ids (n,), got {masks.shape} and {ids.shape}")
    n = masks.shape[0]
    if n == 0:
        return b""
    flat = masks.reshape(n, -1)
    if flat.dtype != np.uint8:
        if flat.min() < 0 or flat.max() >= NUM_CLASSES:
            raise ValueError(f"mask values must be 0..{NUM_CLASSES - 1}")
        flat = flat.astype(np.uint8)
    elif flat.max() >= NUM_CLASSES:
        raise ValueError(f"mask values must be 0..{NUM_CLASSES - 1}, found {int(flat.max())}")
    # One fixed-width body per row: digit, separator, digit, ..., newline.
    body = np.empty((n, 2 * flat.shape[1]), dtype=np.uint8)
    body[:, 0::2] = flat
    body[:, 0::2] += _ZERO
    body[:, 1::2] = _COMMA
    body[:, -1] = _NL
    prefixes = [f"{int(i)},".encode() for i in ids]
    if len({len(p) for p in prefixes}) == 1:
        # All ids have the same width (the usual case): one 2-D array, one tobytes().
        pre = np.frombuffer(b"".join(prefixes), dtype=np.uint8).reshape(n, -1)
        return np.concatenate([pre, body], axis=1).tobytes()
    rows = body.tobytes()
    w = body.shape[1]
    return b"".join(p + rows[k * w:(k + 1) * w] for k, p in enumerate(prefixes))


class SubmissionWriter:
    """Streams batches of (ids, masks) into a CSV atomically.

    Use as a context manager; rows must arrive in strictly increasing id order.
    On a clean exit the file is validated and renamed into place; on any
    exception the temporary file is removed and nothing appears at ``path``.
    """

    def __init__(self, path: str | os.PathLike, *, expected_rows: int | None = None,
                 validate: bool = True, defer: bool = False):
        """``defer``: a clean exit closes and validates the file but leaves it under its
        temporary name until `commit` (or `discard`), so it can be committed together
        with another output."""
        self.path = check_out_path(path)
        self._atomic = atomic_path(self.path)
        self.defer = defer
        self.tmp: Path | None = None
        self.expected_rows = expected_rows
        self.validate = validate
        self.rows = 0
        self.num_pixels: int | None = None
        self._last_id: int | None = None
        self._f = None

    def __enter__(self) -> SubmissionWriter:
        self.tmp = self._atomic.__enter__()
        self._f = open(self.tmp, "wb")
        return self

    def write(self, ids: np.ndarray, masks: np.ndarray) -> None:
        """Append rows. Shape: ids (n,), masks (n, H, W) with labels 0..4."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        masks = np.asarray(masks)
        npx = int(np.prod(masks.shape[1:]))
        if self.num_pixels is None:
            self.num_pixels = npx
            self._f.write(header(npx))
        elif npx != self.num_pixels:
            raise ValueError(f"mask size changed from {self.num_pixels} to {npx} pixels")
        if np.any(np.diff(ids) <= 0) or (self._last_id is not None and ids[0] <= self._last_id):
            raise ValueError("rows must be written in strictly increasing id order")
        self._f.write(format_rows(ids, masks))
        self._last_id = int(ids[-1])
        self.rows += len(ids)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._f.close()
            if exc_type is None:
                if self.num_pixels is None:  # no rows at all: still a valid header-only file
                    self.tmp.write_bytes(header())
                    self.num_pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
                if self.validate:
                    validate_submission(self.tmp, expected_rows=self.expected_rows,
                                        num_pixels=self.num_pixels)
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)  # removes the temporary file
            raise
        if exc_type is not None or not self.defer:
            self._atomic.__exit__(exc_type, exc, tb)  # renamed into place, or removed on error

    def commit(self) -> None:
        """Rename a deferred, validated file into place."""
        self._atomic.__exit__(None, None, None)

    def discard(self) -> None:
        """Remove a deferred file (another output failed)."""
        try:
            self._atomic.__exit__(RuntimeError, RuntimeError("discarded"), None)
        except RuntimeError:
            pass


def write_submission(path: str | os.PathLike, ids: np.ndarray, masks: np.ndarray) -> Path:
    """Write a whole submission at once (sorted by id). Shape: ids (n,), masks (n, H, W)."""
    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    with SubmissionWriter(path, expected_rows=len(ids)) as w:
        for s in range(0, len(ids), 1024):
            sel = order[s:s + 1024]
            w.write(ids[sel], np.asarray(masks)[sel])
    return w.path


def _lines(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as f:
        yield from f


def validate_submission(path: str | os.PathLike, *, expected_rows: int | None = None,
                        num_pixels: int = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]) -> int:
    """Check header, row count, row width, id order and label range; return the row count.

    Raises InputError naming the file and the first bad line.
    """
    path = Path(path)
    want_header = header(num_pixels)
    body_len = 2 * num_pixels
    n = 0
    last = None
    lines = _lines(path)
    first = next(lines, b"")
    if first != want_header:
        raise InputError(f"{path}: header is not 'id,0,1,...,{num_pixels - 1}'")
    lo, hi = _ZERO, _ZERO + NUM_CLASSES - 1
    for lineno, line in enumerate(lines, start=2):
        comma = line.find(b",")
        if comma <= 0 or len(line) - comma - 1 != body_len:
            raise InputError(f"{path}: line {lineno} does not have {num_pixels} values")
        try:
            rid = int(line[:comma])
        except ValueError:
            raise InputError(f"{path}: line {lineno} has a non-integer id") from None
        if last is not None and rid <= last:
            raise InputError(f"{path}: line {lineno}: ids not in increasing order")
        last = rid
        b = np.frombuffer(line, dtype=np.uint8, offset=comma + 1).reshape(-1, 2)
        d = b[:, 0]
        if d.min() < lo or d.max() > hi:
            raise InputError(f"{path}: line {lineno} has a label outside 0..{NUM_CLASSES - 1}")
        if (b[:-1, 1] != _COMMA).any() or b[-1, 1] != _NL:
            raise InputError(f"{path}: line {lineno} is not comma-separated single digits")
        n += 1
    if expected_rows is not None and n != expected_rows:
        raise InputError(f"{path}: {n} rows, expected {expected_rows}")
    return n


def read_submission(path: str | os.PathLike,
                    shape: tuple[int, int] = IMAGE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Read a submission back: ids int64 (n,), masks uint8 (n, H, W). Validates first."""
    path = Path(path)
    npx = shape[0] * shape[1]
    n = validate_submission(path, num_pixels=npx)
    ids = np.empty(n, dtype=np.int64)
    masks = np.empty((n, npx), dtype=np.uint8)
    lines = _lines(path)
    next(lines)
    for k, line in enumerate(lines):
        comma = line.find(b",")
        ids[k] = int(line[:comma])
        masks[k] = np.frombuffer(line, dtype=np.uint8, offset=comma + 1)[0::2] - _ZERO
    return ids, masks.reshape(n, *shape)
