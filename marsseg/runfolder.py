"""The run folder of train-folds: its names, readers, writers, lock and integrity checks.

Only this module spells the layout out; every stage asks it::

    <run>/  recipe.toml overrides.json data.json splits.json ensemble.json scores.json .lock
            <member>/fold_<k>/  model.safetensors config.json metrics.jsonl state/ oof.h5
                                done.json .lock

``data.json`` records the shards the run was made from (the ``dataset.json`` sha256
and every train shard's sha256); other data is refused. ``done.json`` (a `records.Done`)
holds the sha256 of the fold's weights; a finished fold whose weights differ is an error.
``cache/`` holds backend conversions named by `cache_key`. The records' types and checks
live in `records`; a fold's ``state/`` is saved, checked and resumed by `checkpoint`.

The run folder's lock (`_lock.file_lock`) guards the shared files (recipe, data
record, splits, ensemble.json) while they are read and written; each fold's lock is
held while the fold trains, so train-folds processes with different ``--folds`` (the
SLURM array) share a run folder, and one asking for a fold in training stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ._io import (
    atomic_path,
    check_space,
    check_writable,
    inside,
    read_json,
    sha256_file,
    write_json_atomic,
)
from ._lock import file_lock
from .data import read_dataset, verify_shards
from .data.source import ShardSource
from .errors import InputError
from .records import Done, EnsembleSpec, FoldSpec, check_splits

RECIPE = "recipe.toml"
OVERRIDES = "overrides.json"
DATA = "data.json"
SPLITS = "splits.json"
ENSEMBLE = "ensemble.json"
SCORES = "scores.json"
LOCK = ".lock"
# inside a fold folder
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
STATE = "state"
TRAINER_STATE = "trainer.json"
OOF = "oof.h5"
DONE = "done.json"
BUDGET = "budget.json"  # with --time-budget: the fold's epochs, decided before epoch 0
TRACKING = "tracking.json"  # --log-with: a fold's tracked runs (`tracking.TRACKING`, written there)
#: what another run adopts of a finished fold folder (train-folds --reuse): never state/ (the
#: fold is finished) nor cache/ (conversions are made again when needed)
FINISHED_FILES = (WEIGHTS, CONFIG, METRICS, OOF, TRACKING)
CACHE = "cache"  # backend conversions of the fold's weights (`cache_key` names them)
#: exactly the names a conversion writes: ``<backend>-<prec>-<sha16>-b<n>[-torch<v>]``, an
#: optional ``.tmp-<pid>`` while it is written, and one of the cache's extensions
CACHE_NAME_RE = re.compile(r"(?P<backend>[a-z0-9]+(?:-[a-z0-9]+)*?)-(?P<prec>bf16|fp16|f32)-"
                           r"(?P<sha>[0-9a-f]{16})-b[0-9]+(?:-torch[0-9][0-9_]*)?"
                           r"(?:\.tmp-(?P<pid>[0-9]+))?\.(?P<ext>xml|bin|pt2|json)")
METRICS_BOOKKEEPING = frozenset({"epoch", "step", "fold", "time", "seconds", "wall_s", "pid", "img_s",
                                 "images_per_s", "best_epoch", "threads", "worker"})  # not curves

#: seconds to wait for the run folder's lock (held only while shared files are written)
LOCK_WAIT = 120.0


def fold_name(member: str, fold: int) -> str:
    """``member/fold_k``: a fold's path inside the run folder and its display name."""
    return f"{member}/fold_{fold}"


def cache_key(fold_dir: Path, backend: str, precision: str, sha: str, n: int,
              torch_version: str | None = None) -> Path:
    """A conversion's name in the fold's cache folder, without extension: backend,
    precision, the weights' sha256 (16 digits), static batch ``n`` and, for a conversion
    that depends on it (compile), the torch version."""
    prec = "f32" if precision == "no" else precision
    # no dot in the key: its files are <key>.pt2, <key>.json (CACHE_NAME_RE)
    tag = f"-torch{torch_version.split('+')[0].replace('.', '_')}" if torch_version else ""
    return Path(fold_dir) / CACHE / f"{backend}-{prec}-{sha[:16]}-b{n}{tag}"


# --- data fingerprint -------------------------------------------------------------------------


def data_fingerprint(shard_dir: str | os.PathLike | ShardSource) -> dict:
    """What a run records about its data: path, dataset.json sha256, source and train shard
    sha256s (the train shards are verified on the way). ``shard_dir``: a path or an
    opened shard folder (its dataset.json is not read again)."""
    info = shard_dir.info if isinstance(shard_dir, ShardSource) else None
    shard_dir = Path(shard_dir).resolve()
    info = info if info is not None else read_dataset(shard_dir)
    shards = verify_shards(shard_dir, "train", info)
    return {"path": str(shard_dir), "dataset_sha256": sha256_file(shard_dir / "dataset.json"),
            "source_sha256": info.get("source", {}).get("sha256"),
            "train_shards": [{"file": s["file"], "count": s["count"], "sha256": s["sha256"]}
                             for s in shards]}


# --- the run folder ---------------------------------------------------------------------------


class RunFolder:
    """A train-folds run folder at `path` (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._verified: dict[tuple[str, int], Done] = {}  # weights hashed once per command

    recipe = property(lambda self: self.path / RECIPE)
    overrides = property(lambda self: self.path / OVERRIDES)
    data = property(lambda self: self.path / DATA)
    splits = property(lambda self: self.path / SPLITS)
    ensemble = property(lambda self: self.path / ENSEMBLE)
    scores = property(lambda self: self.path / SCORES)
    lock_file = property(lambda self: self.path / LOCK)

    def fold_dir(self, member: str, fold: int) -> Path:
        return self.path / fold_name(member, fold)

    def fold_path(self, member: str, entry: FoldSpec) -> Path:
        """The folder of an ensemble.json fold entry (its "path", else the standard place),
        refused when it leaves the run folder (a symbolic link to another run included)."""
        rel = entry.path if entry.path is not None else fold_name(member, entry.fold)
        return inside(self.path, rel, f"{self.ensemble}: {member} fold {entry.fold}")

    def is_fold_folder(self) -> bool:
        """A single fold folder (config.json, no ensemble.json) instead of a run folder."""
        return (self.path / CONFIG).is_file() and not self.ensemble.exists()

    # --- checks before anything is written ---------------------------------------------------

    def check_target(self) -> None:
        """`path` may be created: it is a folder or absent, and its parent is not a file."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a folder")
        for p in self.path.parents:
            if p.exists():
                if not p.is_dir():
                    raise InputError(f"{p}: is a file, so {self.path} cannot be created")
                break

    def check_writable(self) -> None:
        check_writable(self.path)

    def check_data(self, fp: dict) -> None:
        """Refuse data other than the data this run was made from (its train shards)."""
        old = self.read_data()
        if old is None:
            return
        if [s["sha256"] for s in old.get("train_shards", [])] != \
                [s["sha256"] for s in fp["train_shards"]]:
            raise InputError(f"{fp['path']}: not the data this run folder was made from "
                             f"({self.data} records {old.get('path')}); use that data or a new "
                             f"--out")

    def check_source(self, npz: Path) -> None:
        """Like `check_data` for an npz: its sha256 must be the recorded source file's."""
        old = self.read_data()
        if old is not None and old.get("source_sha256") not in (None, sha256_file(npz)):
            raise InputError(f"{npz}: not the data this run folder was made from "
                             f"({self.data} records {old.get('path')})")

    # --- lock ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait: float = LOCK_WAIT):
        """Context manager: the run folder's lock (creates the folder; a folder created here
        is removed again when the block fails, so a failed first start leaves nothing)."""
        self.check_target()
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.path}: cannot create the run folder ({e.strerror})") from None
        try:
            with file_lock(self.lock_file, f"run folder {self.path}", wait):
                yield
        except BaseException:
            if created:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def lock_folds(self, folds: Sequence[tuple[str, int]]) -> contextlib.ExitStack:
        """Lock every (member, fold) at once or none: an InputError names the first busy one."""
        stack = contextlib.ExitStack()
        try:
            for m, f in folds:
                d = self.fold_dir(m, f)
                d.mkdir(parents=True, exist_ok=True)
                stack.enter_context(file_lock(d / LOCK, f"run folder {self.path} "
                                                        f"({fold_name(m, f)})"))
        except BaseException:
            stack.close()
            raise
        return stack

    # --- small JSON files ---------------------------------------------------------------------

    def read_data(self) -> dict | None:
        d = read_json(self.data, "data record")
        if d is not None and (not isinstance(d, dict) or not isinstance(d.get("train_shards"), list)):
            raise InputError(f"{self.data}: malformed data record (no 'train_shards' list)")
        return d

    def write_data(self, fp: dict) -> None:
        write_json_atomic(self.data, fp)

    def read_overrides(self) -> dict:
        d = read_json(self.overrides, "overrides")
        return d if isinstance(d, dict) else {}

    # --- ensemble.json ------------------------------------------------------------------------

    def read_ensemble(self) -> EnsembleSpec:
        """Read ensemble.json and check every key a reader relies on (InputError naming it)."""
        if not self.path.is_dir():
            raise InputError(f"{self.path}: run folder does not exist")
        if not self.ensemble.is_file():
            raise InputError(f"{self.ensemble}: missing (not a finished train-folds run folder)")
        spec = EnsembleSpec.from_json(read_json(self.ensemble, "ensemble file"), self.ensemble)
        for m in spec.members:  # every fold folder stays inside the run folder
            for f in m.folds:
                self.fold_path(m.name, f)
        return spec

    def write_ensemble(self, spec: EnsembleSpec) -> None:
        """Write ensemble.json (key order and unknown keys as read; checked as read)."""
        d = spec.to_json()
        EnsembleSpec.from_json(d, self.ensemble)
        write_json_atomic(self.ensemble, d)

    # --- splits.json --------------------------------------------------------------------------

    def read_splits(self) -> dict | None:
        return load_splits(self.splits) if self.splits.exists() else None

    def write_splits(self, splits: dict) -> None:
        save_splits(self.splits, splits)

    def val_ids(self) -> dict:
        """{fold: validation ids} of the run's splits (what out-of-fold scores need)."""
        if not self.splits.is_file():
            raise InputError(f"{self.splits}: missing; out-of-fold scores need the run's splits")
        return {int(f["fold"]): f["val_ids"] for f in load_splits(self.splits)["folds"]}

    # --- a fold's files -----------------------------------------------------------------------

    def read_done(self, member: str, fold: int) -> Done | None:
        """done.json of a fold (None while unfinished); corrupt = InputError naming it."""
        return read_done(self.fold_dir(member, fold), fold_name(member, fold))

    def verify_fold(self, member: str, fold: int) -> Done | None:
        """done.json of a finished fold after checking its weights against its sha256 (once
        per RunFolder: a command hashes each fold's weights once)."""
        if (member, fold) not in self._verified:
            done = verify_fold_folder(self.fold_dir(member, fold), fold_name(member, fold))
            if done is None:
                return None
            self._verified[(member, fold)] = done
        return self._verified[(member, fold)]

    def remember_done(self, records: Sequence[Done]) -> None:
        """Done records of folds this command trained (their sha256 hashed as they finished)."""
        self._verified.update({(d.member, int(d.fold)): d for d in records})

    def write_done(self, done: Done) -> None:
        write_json_atomic(self.fold_dir(done.member, done.fold) / DONE, done.to_json())

    def adopt_fold(self, source: Path, done: Done, reused_from: dict) -> Done:
        """Copy the finished fold folder `source` (its checked `done`) into this run as
        ``done.member``'s fold ``done.fold``, whole or not at all: the files of
        `FINISHED_FILES` go into a hidden temporary folder beside the fold folder, the
        copied weights are checked against done's sha256, done.json (with `reused_from`) is
        written last, and the folder is renamed into place (an unfinished fold folder there
        is replaced). The caller holds the fold's lock; its lock file moves along as a hard
        link, so the lock stays held. Returns the adopted fold's done record."""
        dst = self.fold_dir(done.member, int(done.fold))
        with atomic_path(dst, hidden=True) as tmp:
            tmp.mkdir()
            with contextlib.suppress(OSError):  # no fold folder yet, or no hard links here
                os.link(dst / LOCK, tmp / LOCK)
            for name in FINISHED_FILES:
                if (Path(source) / name).is_file():
                    shutil.copyfile(Path(source) / name, tmp / name)
            if sha256_file(tmp / WEIGHTS) != done.sha256:
                raise InputError(f"{tmp / WEIGHTS}: the copy of {Path(source) / WEIGHTS} has "
                                 "another sha256 (a failing disk?)")
            new = dataclasses.replace(done, reused_from=reused_from)
            write_json_atomic(tmp / DONE, new.to_json())
        self._verified[(done.member, int(done.fold))] = new
        return new


def read_done(folder: Path, name: str) -> Done | None:
    """done.json of the fold folder `folder` (None while unfinished); corrupt = InputError."""
    path = Path(folder) / DONE
    d = read_json(path, "done file")
    return None if d is None else Done.from_json(d, path, f"delete {path.parent} to train {name} again")


def verify_fold_folder(folder: Path, name: str) -> Done | None:
    """done.json of a finished fold folder after checking its weights against its sha256
    (None while unfinished)."""
    done = read_done(folder, name)
    if done is None:
        return None
    weights, hint = Path(folder) / WEIGHTS, f"delete {folder} to train {name} again"
    if not weights.is_file():
        raise InputError(f"{weights}: missing, but {folder / DONE} says the fold is finished; "
                         f"{hint}")
    if sha256_file(weights) != done.sha256:
        raise InputError(f"{weights}: sha256 differs from {folder / DONE} (replaced or "
                         f"corrupted); {hint}")
    return done


# --- splits.json ------------------------------------------------------------------------------


def save_splits(path: Path, splits: dict) -> None:
    """Write splits {"k","seed","folds":[{"fold","val_ids","train_ids"}]} atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(splits))


def load_splits(path: Path) -> dict:
    """Read and check a splits file (keys, one entry per fold, val sets disjoint)."""
    path = Path(path)
    d = read_json(path, "splits file")
    if d is None:
        raise InputError(f"{path}: no such file")
    check_splits(d, path)
    return d


# --- metrics.jsonl and oof.h5 -----------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """One dict per epoch line; a line cut short by a killed writer is skipped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the lines of epochs <= last_epoch (those a saved state includes)."""
    rows = [r for r in read_metrics(path) if r.get("epoch", 1 << 30) <= last_epoch]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_oof(path: Path, ids, probs) -> None:
    """ids i64 (n,), probs f16 (n,5,H,W): a fold's out-of-fold softmax."""
    import h5py
    import numpy as np

    ids = np.asarray(ids, np.int64)
    check_space(path, ids.nbytes + probs.nbytes)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=ids)
            # Uncompressed: softmax f16 barely compresses (lzf saved ~4%) and costs time.
            f.create_dataset("probs", data=probs, chunks=(1, *probs.shape[1:]))
            f.attrs["format_version"] = 1
        with h5py.File(tmp, "r") as f:  # checked before the rename: a full disk can cut it
            whole = np.array_equal(f["ids"][()], ids) and np.array_equal(f["probs"][()], probs)
        if not whole:
            raise InputError(f"{path}: does not read back as written (a full or failing disk?)")


def oof_chunks(path: Path, rows: int | None = 64):
    """Yield (ids i64 (b,), probs f16 (b,5,H,W)) of a fold's out-of-fold file, ``rows`` images at
    a time (None: all in one); unreadable or misshapen = InputError naming it."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ids, probs = f["ids"], f["probs"]
            if probs.ndim != 4 or len(probs) != len(ids):
                raise InputError(f"{path}: out-of-fold probs of shape {probs.shape} for {len(ids)} ids")
            for s in range(0, max(len(ids), 1), rows or max(len(ids), 1)):
                yield ids[s:s + (rows or len(ids))], probs[s:s + (rows or len(ids))]
    except (OSError, KeyError) as e:
        raise InputError(f"{path}: unreadable out-of-fold file ({e})") from None


def read_oof(path: Path):
    """(ids, probs) of a fold's out-of-fold file, whole (`oof_chunks` streams it)."""
    return next(oof_chunks(path, None))
