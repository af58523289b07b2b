"""The shard folder format: `dataset.json` plus `<split>-<k>.h5` files; write and read them.

One HDF5 file holds consecutive rows of one split: `images`, `ids`, `groups` and, when
labeled, `masks`, `class_counts`, `bg_fraction` (and `outlier` for train). `prepare`
(writer.py) builds a folder from an npz; `load_split` reads a whole split into memory and
`iter_batches` streams it shard by shard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from .._io import inside, read_json, sha256_file
from .._lock import folder_lock
from ..errors import InputError
from .cleaning import bg_fraction, class_counts

FORMAT_VERSION = 1
SPLITS = ("train", "test")
DATASET_JSON = "dataset.json"


def shard_name(split: str, k: int) -> str:
    """File name of the k-th shard of a split: `train-000.h5`."""
    return f"{split}-{k:03d}.h5"


def write_shard(path: Path, split: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one shard file: the format attributes and one dataset per array."""
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


def read_dataset(shard_dir: Path) -> dict:
    """Load and check `dataset.json` of a shard folder (files present, version known)."""
    shard_dir = Path(shard_dir)
    if not shard_dir.exists():
        raise InputError(f"{shard_dir}: no such folder")
    if not shard_dir.is_dir():
        raise InputError(f"{shard_dir}: not a shard folder (run `marsseg-cli prepare` first)")
    meta = shard_dir / DATASET_JSON
    if not meta.exists():
        raise InputError(f"{shard_dir}: no dataset.json, not a prepared shard folder")
    info = read_json(meta, "dataset record")
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        v = info.get("format_version") if isinstance(info, dict) else None
        raise InputError(f"{meta}: format_version {v!r}, expected {FORMAT_VERSION}")
    try:
        for split in SPLITS:
            for s in info["splits"][split]["shards"]:
                inside(shard_dir, s["file"] if isinstance(s["file"], str) else "",
                       f"{meta}: splits.{split} shard file")
                if "/" in s["file"]:
                    raise InputError(f"{meta}: splits.{split} shard file {s['file']!r} is not a "
                                     f"file name in {shard_dir}")
                if not (shard_dir / s["file"]).is_file():
                    raise InputError(
                        f"{shard_dir / s['file']}: shard listed in dataset.json is missing"
                    )
    except (KeyError, TypeError) as e:
        raise InputError(f"{meta}: malformed, missing {e}") from None
    return info


def pinned(shard_dir: Path):
    """Context: the shard folder pinned while a command reads it (a shared lock on the
    folder): `prepare --force` refuses to replace it meanwhile (`replacing`). Anything
    else (an npz, a missing path) is not pinned."""
    import contextlib

    from .._lock import folder_lock

    if not Path(shard_dir).is_dir():
        return contextlib.nullcontext()
    return folder_lock(Path(shard_dir), True,
                       f"{shard_dir}: being replaced by `prepare --force` right now; "
                       "run again when it has finished")


def reads_data(fn):
    """Decorator: the call's ``data`` argument (a shard folder) stays `pinned` while
    ``fn`` runs, so `prepare --force` cannot swap it under a running command."""
    import functools
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        data = sig.bind_partial(*args, **kwargs).arguments.get("data")
        with pinned(data) if data is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return wrapper


def replacing(shard_dir: Path):
    """Context: the shard folder held exclusively by `prepare --force`, which replaces it;
    refused while a predict, evaluate or train-folds reads it (`pinned`)."""
    return folder_lock(Path(shard_dir), False,
                       f"{shard_dir}: is being read by a running command (predict, evaluate "
                       "or train-folds); wait for it to finish, or prepare into "
                       "another --out")


def _identity(shard_dir: Path) -> tuple[int, int]:
    try:
        st = (Path(shard_dir) / DATASET_JSON).stat()
    except OSError:
        return (-1, -1)
    return (st.st_dev, st.st_ino)


def check_split(split: str) -> None:
    """InputError unless `split` is train or test."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}', expected one of: {', '.join(SPLITS)}")


def shard_paths(shard_dir: Path, split: str, info: dict | None = None) -> list[Path]:
    """Shard files of one split in id order (``info``: dataset.json as already read)."""
    return [p for p, _ in _listed(shard_dir, split, info)]


def _listed(shard_dir: Path, split: str, info: dict | None = None) -> list[tuple[Path, int]]:
    """(shard file, row count dataset.json lists for it) of one split in id order."""
    check_split(split)
    info = info if info is not None else read_dataset(shard_dir)
    try:
        return [(Path(shard_dir) / s["file"], int(s["count"]))
                for s in info["splits"][split]["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{Path(shard_dir) / DATASET_JSON}: malformed shard entry ({e})") from None


def check_rows(f, path: Path, count: int) -> int:
    """InputError unless every dataset of the open shard ``f`` has the ``count`` rows
    dataset.json lists for it (a shard claiming 10^9 rows is refused before a read)."""
    if "ids" not in f or "images" not in f:
        raise InputError(f"{path}: not a marsseg shard (no 'images' or 'ids' dataset)")
    for k in f.keys():
        shape = f[k].shape
        if not shape or shape[0] != count:
            rows = shape[0] if shape else "no"
            raise InputError(f"{path}: dataset '{k}' has {rows} rows; dataset.json lists "
                             f"{count} for this shard")
    return count


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


def load_split(shard_dir: Path, split: str, info: dict | None = None) -> Split:
    """Read a whole split of a shard folder into memory (small data: ~45 MB for 2,700 images)."""
    parts: dict[str, list] = {}
    for p, count in _listed(shard_dir, split, info):
        with _open_h5(p) as f:
            check_rows(f, p, count)
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
    if not parts:  # a split without shards: no rows
        parts = {"images": [np.zeros((0, *IMAGE_SHAPE), np.uint8)], "ids": [np.zeros(0, np.int64)]}
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    masks = cat.get("masks")
    n = len(cat["ids"])
    if masks is not None and "class_counts" not in cat:
        cat["class_counts"] = class_counts(masks)
    cc = cat.get("class_counts")
    bg = cat.get("bg_fraction")
    if bg is None and cc is not None:
        bg = bg_fraction(cc)
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


def rebatch(chunks: Iterable[tuple], batch_size: int) -> Iterator[tuple]:
    """Regroup a stream of (ids, images[, masks]) chunks into batches of exactly
    ``batch_size`` (the last may be smaller)."""
    buf: list[tuple] = []
    have = 0
    for chunk in chunks:
        buf.append(chunk)
        have += len(chunk[0])
        while have >= batch_size:
            cat = tuple(np.concatenate([c[j] for c in buf]) for j in range(len(chunk)))
            yield tuple(a[:batch_size] for a in cat)
            rest = tuple(a[batch_size:] for a in cat)
            buf, have = ([rest] if len(rest[0]) else []), len(rest[0])
    if have:
        yield tuple(np.concatenate([c[j] for c in buf]) for j in range(len(buf[0])))


def iter_batches(
    shard_dir: Path, split: str, batch_size: int, with_masks: bool = False,
    info: dict | None = None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Stream (ids int64 (b,), images uint8 (b, 64, 128)[, masks uint8 (b, 64, 128)]).

    Shard by shard in id order; at most one shard slice plus one batch in memory.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1 (got {batch_size})")
    info = info if info is not None else read_dataset(shard_dir)
    listed = _listed(shard_dir, split, info)
    if with_masks and not info["splits"][split]["labeled"]:
        raise InputError(f"{shard_dir}: split '{split}' has no masks")

    first = _identity(shard_dir)

    def chunks():
        for p, count in listed:
            if _identity(shard_dir) != first:  # prepare --force swapped the folder under us
                raise InputError(f"{shard_dir}: was replaced while being read (by `prepare "
                                 "--force`?); nothing was written, run again")
            with _open_h5(p) as f:
                n = check_rows(f, p, count)
                for s in range(0, n, batch_size):
                    item = (f["ids"][s : s + batch_size], f["images"][s : s + batch_size])
                    if with_masks:
                        item += (f["masks"][s : s + batch_size],)
                        check_labels(item[-1], p, s)
                    yield item

    return rebatch(chunks(), batch_size)


def read_flags(shard_dir: Path, split: str, info: dict | None = None) -> dict[str, np.ndarray]:
    """The small per-image datasets of a split (no images or masks are read)."""
    parts: dict[str, list] = {}
    for p, count in _listed(shard_dir, split, info):
        with _open_h5(p) as f:
            check_rows(f, p, count)
            for k in ("class_counts", "bg_fraction", "outlier", "groups"):
                if k in f:
                    parts.setdefault(k, []).append(f[k][()])
    return {k: np.concatenate(v) for k, v in parts.items()}


def verify_shards(shard_dir: str | os.PathLike, split: str, info: dict | None = None
                  ) -> list[dict]:
    """Check every shard of `split` against the sha256 in dataset.json; returns its entries.

    Run once per command: a shard edited after `prepare` is an InputError naming it.
    """
    shard_dir = Path(shard_dir)
    info = info if info is not None else read_dataset(shard_dir)
    entries = info["splits"][split]["shards"]
    for s in entries:
        path = shard_dir / s["file"]
        if sha256_file(path) != s.get("sha256"):
            raise InputError(f"{path}: sha256 differs from {shard_dir / 'dataset.json'} (edited or "
                             "corrupted after prepare); prepare the data again")
    return entries


def check_shards(shard_dir: Path, split: str, info: dict | None = None) -> None:
    """Check every shard of ``split`` against its sha256 in dataset.json and its image shape
    (HDF5 metadata), so an edited, truncated or foreign shard fails before any prediction work."""
    import h5py

    info = info if info is not None else read_dataset(shard_dir)
    for path in shard_paths(shard_dir, split, info):
        try:
            with h5py.File(path, "r") as f:
                shape = f["images"].shape
                n_ids = f["ids"].shape[0]
        except KeyError as e:
            raise InputError(f"{path}: missing dataset {e}") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read HDF5 shard (truncated or corrupt: "
                             f"{str(e).splitlines()[0]})") from None
        if len(shape) != 3 or tuple(shape[1:]) != tuple(IMAGE_SHAPE):
            raise InputError(f"{path}: images have shape {tuple(shape[1:])}, "
                             f"expected {tuple(IMAGE_SHAPE)}")
        if n_ids != shape[0]:
            raise InputError(f"{path}: {n_ids} ids for {shape[0]} images")
    verify_shards(shard_dir, split, info)
