"""Input npz reading and validation, cleaning flags, HDF5 shard writing and reading.

Flow: `load_npz` validates the course layout -> `prepare` writes `train-000.h5`...,
`test-000.h5`... and `dataset.json` into a temp folder and renames it into place ->
`load_split` / `iter_batches` / `ShardDataset` read it back. Preparing never drops a
sample; it flags duplicate-mask outliers and stores each image's background fraction,
and recipes choose what to skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from ._io import atomic_path, sha256_file
from .errors import InputError
from .stream import rebatch

FORMAT_VERSION = 1
SPLITS = ("train", "test")
DEFAULT_OUTLIER_MIN_COUNT = 10
DEFAULT_MAX_BACKGROUND = 0.8
HIST_EDGES = [round(0.1 * i, 1) for i in range(11)]


# ----------------------------------------------------------------------------- npz input


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


# ----------------------------------------------------------------------------- cleaning


def class_counts(masks: np.ndarray) -> np.ndarray:
    """Per-image class pixel counts: masks uint8 (n, H, W) -> int64 (n, 5)."""
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0, NUM_CLASSES), np.int64)
    flat = masks.reshape(n, -1).astype(np.int64) + NUM_CLASSES * np.arange(n)[:, None]
    return np.bincount(flat.ravel(), minlength=n * NUM_CLASSES).reshape(n, NUM_CLASSES)


def duplicate_mask_groups(
    masks: np.ndarray, min_count: int = DEFAULT_OUTLIER_MIN_COUNT
) -> tuple[list[dict], list[dict]]:
    """Masks shared identically by >= min_count images.

    Returns (outlier groups, uniform groups), each a list of {"count", "ids", "classes"}
    sorted by count. A shared mask with two or more labeled classes is an outlier group
    (like the course file's 110 "alien" images). A shared mask with a single labeled
    class is not: a band that is all soil with the same border occurs naturally (real_mars
    has 24 of them), so those groups are reported but not flagged.
    """
    by_hash: dict[bytes, list[int]] = {}
    for i, m in enumerate(masks):
        by_hash.setdefault(hashlib.blake2b(m.tobytes(), digest_size=16).digest(), []).append(i)
    outliers, uniform = [], []
    for ids in by_hash.values():
        if len(ids) < min_count:
            continue
        labeled = sorted(int(c) for c in np.unique(masks[ids[0]]) if c != 0)
        entry = {"count": len(ids), "ids": ids, "classes": labeled}
        (outliers if len(labeled) >= 2 else uniform).append(entry)
    outliers.sort(key=lambda g: (-g["count"], g["ids"][0]))
    uniform.sort(key=lambda g: (-g["count"], g["ids"][0]))
    return outliers, uniform


def bg_histogram(bg_fraction: np.ndarray) -> list[int]:
    """Counts of background fraction in ten bins 0-0.1 ... 0.9-1.0 (1.0 in the last)."""
    return np.histogram(bg_fraction, bins=HIST_EDGES)[0].astype(int).tolist()


def clean_keep(outlier: np.ndarray, bg_fraction: np.ndarray, max_background: float) -> np.ndarray:
    """Rows kept by the standard cleaning: not an outlier and background <= max_background."""
    return ~outlier.astype(bool) & (bg_fraction <= max_background)


# ----------------------------------------------------------------------------- shards



def _write_shard(path: Path, split: str, arrays: dict[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["split"] = split
        f.attrs["class_names"] = list(CLASS_NAMES)
        for name, a in arrays.items():
            if a.dtype.kind == "U":
                f.create_dataset(name, data=a.astype(object), dtype=h5py.string_dtype())
            else:
                f.create_dataset(name, data=a)


def _write_split(
    tmp: Path, split: str, arrays: dict[str, np.ndarray], shard_size: int
) -> list[dict]:
    n = len(arrays["ids"])
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        name = f"{split}-{k:03d}.h5"
        _write_shard(
            tmp / name, split, {key: a[start : start + shard_size] for key, a in arrays.items()}
        )
        shards.append(
            {"file": name, "count": min(shard_size, n - start), "sha256": sha256_file(tmp / name)}
        )
    return shards


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise InputError(f"{out_dir}: already exists (use --force to replace it)")
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: exists and is not a directory; not replacing it")
        # Refuse to wipe a folder that is not ours (e.g. `prepare x.npz ~ --force`).
        if any(out_dir.iterdir()) and not (out_dir / "dataset.json").exists():
            raise InputError(
                f"{out_dir}: exists, is not empty and has no dataset.json; not replacing it"
            )


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
    if shard_size < 1:
        raise InputError(f"{out_dir}: --shard-size must be at least 1 (got {shard_size})")
    if outlier_min_count < 2:
        raise InputError(
            f"{out_dir}: --outlier-min-count must be at least 2 (got {outlier_min_count})"
        )
    if not 0.0 <= max_background <= 1.0:
        raise InputError(f"{out_dir}: --max-background must be in 0..1 (got {max_background})")
    _check_out_dir(out_dir, force)
    if out_dir.exists() and src.resolve().is_relative_to(out_dir.resolve()):
        raise InputError(f"{src}: is inside {out_dir}, which --force would replace")
    data = load_npz(src)

    n, m = len(data.train_images), len(data.test_images)
    train_counts = class_counts(data.train_masks)
    bg = (train_counts[:, 0] / float(np.prod(IMAGE_SHAPE))).astype(np.float32)
    groups_out, groups_uniform = duplicate_mask_groups(data.train_masks, outlier_min_count)
    outlier = np.zeros(n, np.uint8)
    for g in groups_out:
        outlier[g["ids"]] = 1
    keep = clean_keep(outlier, bg, max_background)
    train_ids = np.arange(n, dtype=np.int64)
    train = {
        "images": data.train_images,
        "masks": data.train_masks,
        "ids": train_ids,
        "groups": np.array(data.train_groups or [str(i) for i in range(n)], dtype=str),
        "bg_fraction": bg,
        "outlier": outlier,
        "class_counts": train_counts.astype(np.int32),
    }
    test = {"images": data.test_images, "ids": np.arange(m, dtype=np.int64)}
    test_counts = None
    if data.test_masks is not None:
        test_counts = class_counts(data.test_masks)
        test["masks"] = data.test_masks
        test["bg_fraction"] = (test_counts[:, 0] / float(np.prod(IMAGE_SHAPE))).astype(np.float32)
        test["class_counts"] = test_counts.astype(np.int32)
    if data.test_groups is not None:
        test["groups"] = np.array(data.test_groups, dtype=str)

    with _new_folder(out_dir) as tmp:
        info = {
            "format_version": FORMAT_VERSION,
            "source": {"path": str(src.resolve()), "sha256": sha256_file(src)},
            "image_shape": list(IMAGE_SHAPE),
            "class_names": list(CLASS_NAMES),
            "splits": {
                "train": {
                    "count": n,
                    "labeled": True,
                    "grouped": data.train_groups is not None,
                    "shards": _write_split(tmp, "train", train, shard_size),
                },
                "test": {
                    "count": m,
                    "labeled": data.test_masks is not None,
                    "grouped": data.test_groups is not None,
                    "shards": _write_split(tmp, "test", test, shard_size),
                },
            },
            "class_pixel_counts": {
                "train": train_counts.sum(0).tolist(),
                "train_clean": train_counts[keep].sum(0).tolist(),
                "test": None if test_counts is None else test_counts.sum(0).tolist(),
            },
            "cleaning": {
                "outlier_min_count": outlier_min_count,
                "duplicate_mask_groups": groups_out,
                "uniform_duplicate_groups": groups_uniform,
                "outlier_ids": np.flatnonzero(outlier).tolist(),
                "max_background": max_background,
                "high_background_count": int((bg > max_background).sum()),
                "train_clean_count": int(keep.sum()),
                "bg_fraction_histogram": {
                    "edges": HIST_EDGES,
                    "train": bg_histogram(bg),
                    "test": None if test_counts is None else bg_histogram(test["bg_fraction"]),
                },
            },
        }
        with open(tmp / "dataset.json", "w") as f:
            json.dump(info, f, indent=1)
    return info


@contextlib.contextmanager
def _new_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder that replaces `out_dir` only once it is whole (`atomic_path`)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            yield tmp
    except OSError as e:  # disk full, permissions, a file where a folder should be
        raise InputError(f"{out_dir}: cannot write the shard folder ({e})") from None


# ----------------------------------------------------------------------------- reading


def read_dataset(shard_dir: Path) -> dict:
    """Load and check `dataset.json` of a shard folder (files present, version known)."""
    shard_dir = Path(shard_dir)
    if not shard_dir.exists():
        raise InputError(f"{shard_dir}: no such folder")
    if not shard_dir.is_dir():
        raise InputError(f"{shard_dir}: not a shard folder (run `marsseg-cli prepare` first)")
    meta = shard_dir / "dataset.json"
    if not meta.exists():
        raise InputError(f"{shard_dir}: no dataset.json, not a prepared shard folder")
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        v = info.get("format_version") if isinstance(info, dict) else None
        raise InputError(f"{meta}: format_version {v!r}, expected {FORMAT_VERSION}")
    try:
        for split in SPLITS:
            for s in info["splits"][split]["shards"]:
                if not (shard_dir / s["file"]).is_file():
                    raise InputError(
                        f"{shard_dir / s['file']}: shard listed in dataset.json is missing"
                    )
    except (KeyError, TypeError) as e:
        raise InputError(f"{meta}: malformed, missing {e}") from None
    return info


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}', expected one of: {', '.join(SPLITS)}")


def shard_paths(shard_dir: Path, split: str) -> list[Path]:
    """Shard files of one split in id order."""
    _check_split(split)
    info = read_dataset(shard_dir)
    return [Path(shard_dir) / s["file"] for s in info["splits"][split]["shards"]]


def check_labels(masks: np.ndarray, where, first_row: int = 0) -> None:
    """InputError naming `where` (a shard file) when a mask holds a label outside 0..4."""
    if masks.size == 0:
        return
    bad = masks >= NUM_CLASSES if masks.dtype.kind == "u" else (masks < 0) | (masks >= NUM_CLASSES)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise InputError(f"{where}: 'masks' has label value {masks[i][bad[i]][0]} in row "
                         f"{first_row + i}; labels must be 0..{NUM_CLASSES - 1}")


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: cannot open HDF5 shard ({e})") from None


@dataclass
class Split:
    """One split in memory. images/masks uint8 (n, 64, 128); masks None when unlabeled.

    ids int64 (n,) source rows; groups str (n,); bg_fraction float32 (n,); outlier bool (n,);
    class_counts int64 (n, 5) or None when unlabeled.
    """

    images: np.ndarray
    masks: np.ndarray | None
    ids: np.ndarray
    groups: np.ndarray
    bg_fraction: np.ndarray | None
    outlier: np.ndarray
    class_counts: np.ndarray | None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def big_rock(self) -> np.ndarray:
        """bool (n,): image holds any Big Rock pixel (False everywhere when unlabeled)."""
        if self.class_counts is None:
            return np.zeros(len(self), bool)
        return self.class_counts[:, 4] > 0

    def subset(self, rows: np.ndarray) -> Split:
        """The rows (positions or bool mask) of this split, as a new Split."""

        def pick(a):
            return None if a is None else a[rows]

        return Split(
            pick(self.images),
            pick(self.masks),
            pick(self.ids),
            pick(self.groups),
            pick(self.bg_fraction),
            pick(self.outlier),
            pick(self.class_counts),
        )

    def clean(
        self, max_background: float = DEFAULT_MAX_BACKGROUND, drop_outliers: bool = True
    ) -> Split:
        """The standard cleaning: drop flagged outliers and images mostly background."""
        keep = np.ones(len(self), bool)
        if drop_outliers:
            keep &= ~self.outlier
        if self.bg_fraction is not None:
            keep &= self.bg_fraction <= max_background
        return self.subset(keep)


def _split_from_arrays(images, masks, ids, groups=None, outlier=None) -> Split:
    n = len(ids)
    counts = None if masks is None else class_counts(masks)
    bg = None if counts is None else (counts[:, 0] / float(np.prod(IMAGE_SHAPE))).astype(np.float32)
    return Split(
        images=images,
        masks=masks,
        ids=np.asarray(ids, np.int64),
        groups=np.array(groups if groups is not None else [str(i) for i in ids], dtype=str),
        bg_fraction=bg,
        outlier=np.zeros(n, bool) if outlier is None else np.asarray(outlier, bool),
        class_counts=counts,
    )


def load_split(shard_dir: Path, split: str) -> Split:
    """Read a whole split of a shard folder into memory (small data: ~45 MB for 2,700 images)."""
    paths = shard_paths(shard_dir, split)
    parts: dict[str, list] = {}
    for p in paths:
        with _open_h5(p) as f:
            if "images" not in f or "ids" not in f:
                raise InputError(f"{p}: not a marsseg shard (no 'images' or 'ids' dataset)")
            for k in f.keys():
                try:
                    a = f[k][()]
                except OSError as e:
                    raise InputError(f"{p}: dataset '{k}' is unreadable ({e})") from None
                if k == "masks":
                    check_labels(a, p)
                if k == "groups":
                    a = np.array(
                        [s.decode() if isinstance(s, bytes) else str(s) for s in a], dtype=str
                    )
                parts.setdefault(k, []).append(a)
    if not parts:
        h, w = IMAGE_SHAPE
        return _split_from_arrays(np.zeros((0, h, w), np.uint8), None, np.zeros(0, np.int64))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    masks = cat.get("masks")
    n = len(cat["ids"])
    if masks is not None and "class_counts" not in cat:
        cat["class_counts"] = class_counts(masks)
    cc = cat.get("class_counts")
    bg = cat.get("bg_fraction")
    if bg is None and cc is not None:
        bg = (cc[:, 0] / float(np.prod(IMAGE_SHAPE))).astype(np.float32)
    return Split(
        images=cat["images"],
        masks=masks,
        ids=cat["ids"].astype(np.int64),
        groups=cat["groups"]
        if "groups" in cat
        else np.array([str(i) for i in cat["ids"]], dtype=str),
        bg_fraction=bg,
        outlier=cat["outlier"].astype(bool) if "outlier" in cat else np.zeros(n, bool),
        class_counts=None if cc is None else cc.astype(np.int64),
    )


def load_any(data: Path, split: str) -> Split:
    """A split from a shard folder or straight from an npz (validated, flags computed)."""
    _check_split(split)
    data = Path(data)
    if data.is_dir():
        return load_split(data, split)
    d = load_npz(data)
    if split == "train":
        outlier = np.zeros(len(d.train_images), bool)
        for g in duplicate_mask_groups(d.train_masks)[0]:
            outlier[g["ids"]] = True
        return _split_from_arrays(
            d.train_images, d.train_masks, np.arange(len(d.train_images)), d.train_groups, outlier
        )
    return _split_from_arrays(
        d.test_images, d.test_masks, np.arange(len(d.test_images)), d.test_groups
    )


def iter_batches(
    shard_dir: Path, split: str, batch_size: int, with_masks: bool = False
) -> Iterator[tuple[np.ndarray, ...]]:
    """Stream (ids int64 (b,), images uint8 (b, 64, 128)[, masks uint8 (b, 64, 128)]).

    Shard by shard in id order; at most one shard slice plus one batch in memory.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1 (got {batch_size})")
    paths = shard_paths(shard_dir, split)
    if with_masks and not read_dataset(shard_dir)["splits"][split]["labeled"]:
        raise InputError(f"{shard_dir}: split '{split}' has no masks")

    def chunks():
        for p in paths:
            with _open_h5(p) as f:
                n = f["ids"].shape[0]
                for s in range(0, n, batch_size):
                    item = (f["ids"][s : s + batch_size], f["images"][s : s + batch_size])
                    if with_masks:
                        item += (f["masks"][s : s + batch_size],)
                        check_labels(item[-1], p, s)
                    yield item

    return rebatch(chunks(), batch_size)


def as_batches(
    data: Path, split: str, batch_size: int, with_masks: bool = False
) -> Iterator[tuple[np.ndarray, ...]]:
    """Like `iter_batches`, for a shard folder or an npz file (read into memory)."""
    _check_split(split)
    data = Path(data)
    if data.is_dir():
        return iter_batches(data, split, batch_size, with_masks)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1 (got {batch_size})")
    d = load_npz(data)
    images = d.train_images if split == "train" else d.test_images
    masks = d.train_masks if split == "train" else d.test_masks
    if with_masks and masks is None:
        raise InputError(f"{data}: split '{split}' has no masks (no 'test_masks' key)")

    def gen():
        for s in range(0, len(images), batch_size):
            ids = np.arange(s, min(s + batch_size, len(images)), dtype=np.int64)
            yield (ids, images[s : s + batch_size]) + (
                (masks[s : s + batch_size],) if with_masks else ()
            )

    return gen()


def split_info(data: Path, split: str) -> dict:
    """count and labeled for a split of a shard folder or npz, without loading images."""
    _check_split(split)
    data = Path(data)
    if data.is_dir():
        s = read_dataset(data)["splits"][split]
        return {"count": s["count"], "labeled": s["labeled"]}
    d = load_npz(data)
    if split == "train":
        return {"count": len(d.train_images), "labeled": True}
    return {"count": len(d.test_images), "labeled": d.test_masks is not None}


# ----------------------------------------------------------------------------- torch Dataset

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # torch is a dependency; keep data prep importable without it anyway
    _TorchDataset = object


class ShardDataset(_TorchDataset):
    """Torch Dataset over one split's shards: item -> (image u8 (1,64,128), mask u8 (64,128)).

    HDF5 handles are opened lazily in whichever process reads (h5py handles do not
    pickle or survive fork), so it works with DataLoader workers. The mask is zeros
    for an unlabeled split. `indices` selects positions in the split (e.g. a fold).
    Normalisation happens later, on the training device.
    """

    def __init__(self, shard_dir: Path, split: str, indices=None):
        self.shard_dir = Path(shard_dir)
        self.split = split
        self.paths = shard_paths(self.shard_dir, split)
        info = read_dataset(self.shard_dir)["splits"][split]
        self.labeled = bool(info["labeled"])
        counts = [s["count"] for s in info["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._starts[-1])
        self.indices = np.arange(total) if indices is None else np.asarray(indices, np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= total):
            raise InputError(
                f"{self.shard_dir}: index out of range for split '{split}' ({total} rows)"
            )
        self._files: dict[int, object] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _file(self, k: int):
        if self._pid != os.getpid():  # new worker process: never reuse the parent's handles
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            self._files[k] = _open_h5(self.paths[k])
        return self._files[k]

    def _locate(self, pos: int) -> tuple[int, int]:
        row = int(self.indices[pos])
        k = int(np.searchsorted(self._starts, row, side="right") - 1)
        return k, row - int(self._starts[k])

    def __getitem__(self, pos: int):
        import torch

        if pos < 0:
            pos += len(self)
        k, r = self._locate(pos)
        f = self._file(k)
        image = torch.from_numpy(f["images"][r][None])
        if self.labeled:
            mask = torch.from_numpy(f["masks"][r])
        else:
            mask = torch.zeros(IMAGE_SHAPE, dtype=torch.uint8)
        return image, mask

    def __getitems__(self, positions: list[int]) -> list[tuple]:
        """A whole batch with one HDF5 read per shard (DataLoader calls this when present)."""
        import torch

        pos = np.asarray(positions, np.int64)
        pos[pos < 0] += len(self)
        rows = self.indices[pos]
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        images = np.empty((len(rows), *IMAGE_SHAPE), np.uint8)
        masks = np.zeros((len(rows), *IMAGE_SHAPE), np.uint8)
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            local, inverse = np.unique(rows[sel] - self._starts[k], return_inverse=True)
            f = self._file(int(k))
            images[sel] = f["images"][local][inverse]  # h5py wants increasing, unique rows
            if self.labeled:
                masks[sel] = f["masks"][local][inverse]
        images_t, masks_t = torch.from_numpy(images), torch.from_numpy(masks)
        return [(images_t[i, None], masks_t[i]) for i in range(len(rows))]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- inspect


def _flags_from_shards(shard_dir: Path, split: str) -> dict[str, np.ndarray]:
    """The small per-image datasets of a split (no images or masks are read)."""
    parts: dict[str, list] = {}
    for p in shard_paths(shard_dir, split):
        with _open_h5(p) as f:
            for k in ("class_counts", "bg_fraction", "outlier", "groups"):
                if k in f:
                    parts.setdefault(k, []).append(f[k][()])
    return {k: np.concatenate(v) for k, v in parts.items()}


def describe(
    data: Path,
    max_background: float = DEFAULT_MAX_BACKGROUND,
    outlier_min_count: int = DEFAULT_OUTLIER_MIN_COUNT,
) -> dict:
    """Counts, class pixel counts before/after cleaning, outliers, background histogram.

    `data` is an npz (validated and analysed in memory) or a shard folder (outlier flags
    as stored by `prepare`; `outlier_min_count` then does not apply). Cleaning = drop
    outliers and images whose background fraction exceeds `max_background`.
    """
    data = Path(data)
    if not 0.0 <= max_background <= 1.0:
        raise InputError(f"--max-background must be in 0..1 (got {max_background})")
    if data.is_dir():
        info = read_dataset(data)
        tr = _flags_from_shards(data, "train")
        counts, bg, outlier = (
            tr["class_counts"].astype(np.int64),
            tr["bg_fraction"],
            tr["outlier"].astype(bool),
        )
        groups_out = info["cleaning"]["duplicate_mask_groups"]
        groups_uniform = info["cleaning"].get("uniform_duplicate_groups", [])
        min_count = info["cleaning"].get("outlier_min_count", outlier_min_count)
        n_groups = len(np.unique(tr["groups"])) if info["splits"]["train"].get("grouped") else None
        te_info = info["splits"]["test"]
        test = {"count": te_info["count"], "labeled": te_info["labeled"]}
        te = _flags_from_shards(data, "test") if te_info["labeled"] else {}
        test_counts = te["class_counts"].astype(np.int64) if "class_counts" in te else None
        kind = "shards"
    else:
        d = load_npz(data)
        counts = class_counts(d.train_masks)
        bg = (counts[:, 0] / float(np.prod(IMAGE_SHAPE))).astype(np.float32)
        groups_out, groups_uniform = duplicate_mask_groups(d.train_masks, outlier_min_count)
        outlier = np.zeros(len(counts), bool)
        for g in groups_out:
            outlier[g["ids"]] = True
        min_count = outlier_min_count
        n_groups = len(set(d.train_groups)) if d.train_groups is not None else None
        test = {"count": len(d.test_images), "labeled": d.test_masks is not None}
        test_counts = None if d.test_masks is None else class_counts(d.test_masks)
        kind = "npz"
    keep = clean_keep(outlier, bg, max_background)
    test_bg = None if test_counts is None else test_counts[:, 0] / float(np.prod(IMAGE_SHAPE))
    return {
        "path": str(data),
        "kind": kind,
        "train": {"count": len(counts), "labeled": True, "groups": n_groups},
        "test": test,
        "counts": {
            "train": len(counts),
            "train_clean": int(keep.sum()),
            "outliers": int(outlier.sum()),
            "high_background": int((bg > max_background).sum()),
            "big_rock_images": int((counts[:, 4] > 0).sum()),
        },
        "class_pixel_counts": {
            "train": counts.sum(0).tolist(),
            "train_clean": counts[keep].sum(0).tolist(),
            "test": None if test_counts is None else test_counts.sum(0).tolist(),
        },
        "max_background": max_background,
        "outlier_min_count": min_count,
        "duplicate_mask_groups": groups_out,
        "uniform_duplicate_groups": groups_uniform,
        "bg_fraction_histogram": {
            "edges": HIST_EDGES,
            "train": bg_histogram(bg),
            "test": None if test_bg is None else bg_histogram(test_bg),
        },
    }
