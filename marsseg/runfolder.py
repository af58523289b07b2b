"""The run folder of train-folds: its names, readers, writers, lock and integrity checks.

Only this module spells the layout out; every stage asks it::

    <run>/  recipe.toml overrides.json data.json splits.json ensemble.json scores.json .lock
            <member>/fold_<k>/  model.safetensors config.json metrics.jsonl state/ oof.h5
                                done.json .lock

``data.json`` records the shards the run was made from (the ``dataset.json`` sha256
and every train shard's sha256); other data is refused. ``done.json`` holds the
sha256 of the fold's weights; a finished fold whose weights differ is an error.

The run folder's lock (`_lock.file_lock`) guards the shared files (recipe, data
record, splits, ensemble.json) while they are read and written; each fold's lock is
held while the fold trains, so train-folds processes with different ``--folds`` (the
SLURM array) share a run folder, and one asking for a fold in training stops at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ._io import atomic_path, check_space, check_writable, inside, sha256_file, write_json_atomic
from ._lock import file_lock
from ._records import check_ensemble
from .data import read_dataset, verify_shards
from .errors import InputError

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

#: seconds to wait for the run folder's lock (held only while shared files are written)
LOCK_WAIT = 120.0


def fold_name(member: str, fold: int) -> str:
    """``member/fold_k``: a fold's path inside the run folder and its display name."""
    return f"{member}/fold_{fold}"


# --- data fingerprint -------------------------------------------------------------------------


def data_fingerprint(shard_dir: str | os.PathLike) -> dict:
    """What a run records about its data: path, dataset.json sha256, source and train shard
    sha256s (the train shards are verified on the way)."""
    shard_dir = Path(shard_dir).resolve()
    shards = verify_shards(shard_dir, "train")
    return {"path": str(shard_dir), "dataset_sha256": sha256_file(shard_dir / "dataset.json"),
            "source_sha256": read_dataset(shard_dir).get("source", {}).get("sha256"),
            "train_shards": [{"file": s["file"], "count": s["count"], "sha256": s["sha256"]}
                             for s in shards]}


# --- the run folder ---------------------------------------------------------------------------


class RunFolder:
    """A train-folds run folder at `path` (which need not exist yet)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    recipe = property(lambda self: self.path / RECIPE)
    overrides = property(lambda self: self.path / OVERRIDES)
    data = property(lambda self: self.path / DATA)
    splits = property(lambda self: self.path / SPLITS)
    ensemble = property(lambda self: self.path / ENSEMBLE)
    scores = property(lambda self: self.path / SCORES)
    lock_file = property(lambda self: self.path / LOCK)

    def fold_dir(self, member: str, fold: int) -> Path:
        return self.path / fold_name(member, fold)

    def fold_path(self, member: str, entry: dict) -> Path:
        """The folder of an ensemble.json fold entry (its "path", else the standard place),
        refused when it leaves the run folder (a symbolic link to another run included)."""
        rel = entry.get("path", fold_name(member, int(entry["fold"])))
        return inside(self.path, rel, f"{self.ensemble}: {member} fold {entry['fold']}")

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

    def _read_json(self, path: Path, what: str):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InputError(f"{path}: unreadable {what} ({e})") from None

    def read_data(self) -> dict | None:
        d = self._read_json(self.data, "data record")
        if d is not None and (not isinstance(d, dict) or not isinstance(d.get("train_shards"), list)):
            raise InputError(f"{self.data}: malformed data record (no 'train_shards' list)")
        return d

    def write_data(self, fp: dict) -> None:
        write_json_atomic(self.data, fp)

    def read_overrides(self) -> dict:
        d = self._read_json(self.overrides, "overrides")
        return d if isinstance(d, dict) else {}

    # --- ensemble.json ------------------------------------------------------------------------

    def read_ensemble(self) -> dict:
        """Read ensemble.json and check every key a reader relies on (InputError naming it)."""
        if not self.path.is_dir():
            raise InputError(f"{self.path}: run folder does not exist")
        if not self.ensemble.is_file():
            raise InputError(f"{self.ensemble}: missing (not a finished train-folds run folder)")
        spec = self._read_json(self.ensemble, "ensemble file")
        check_ensemble(spec, self.ensemble)
        for m in spec["members"]:  # every fold folder stays inside the run folder
            for f in m.get("folds", []):
                self.fold_path(m["name"], f)
        return spec

    def write_ensemble(self, spec: dict) -> None:
        check_ensemble(spec, self.ensemble)
        write_json_atomic(self.ensemble, spec)

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

    def read_done(self, member: str, fold: int) -> dict | None:
        """done.json of a fold (None while unfinished); corrupt = InputError naming it."""
        return read_done(self.fold_dir(member, fold), fold_name(member, fold))

    def verify_fold(self, member: str, fold: int) -> dict | None:
        """done.json of a finished fold after checking its weights against its sha256."""
        return verify_fold_folder(self.fold_dir(member, fold), fold_name(member, fold))

    def write_done(self, member: str, fold: int, done: dict) -> None:
        write_json_atomic(self.fold_dir(member, fold) / DONE, done)

    def check_state(self, member: str, fold: int) -> None:
        """An unfinished fold's saved state must load; its best weights must be there."""
        d = self.fold_dir(member, fold)
        state = next((p for p in _state_candidates(d) if (p / TRAINER_STATE).is_file()), None)
        if state is None:
            return
        hint = f"delete {state} to train {fold_name(member, fold)} from epoch 0"
        trainer = read_trainer(state)
        best = trainer.get("best_epoch", -1)
        if (not isinstance(best, int) or best >= 0) and not (d / WEIGHTS).is_file():
            raise InputError(f"{d / WEIGHTS}: missing, but {state} needs it to resume; {hint}")
        for p in sorted(state.iterdir()):
            if p.suffix in (".bin", ".pkl", ".safetensors"):
                try:
                    _load_state_file(p)
                except Exception as e:  # noqa: BLE001 - any failure means "cannot resume"
                    raise InputError(f"{p}: unreadable saved training state "
                                     f"({type(e).__name__}); {hint}") from None


def read_done(folder: Path, name: str) -> dict | None:
    """done.json of the fold folder `folder` (None while unfinished); corrupt = InputError."""
    path = Path(folder) / DONE
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unreadable done file ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("sha256"), str):
        raise InputError(f"{path}: malformed done file (no 'sha256'); delete "
                         f"{path.parent} to train {name} again")
    return d


def verify_fold_folder(folder: Path, name: str) -> dict | None:
    """done.json of a finished fold folder after checking its weights against its sha256
    (None while unfinished)."""
    done = read_done(folder, name)
    if done is None:
        return None
    weights, hint = Path(folder) / WEIGHTS, f"delete {folder} to train {name} again"
    if not weights.is_file():
        raise InputError(f"{weights}: missing, but {folder / DONE} says the fold is finished; "
                         f"{hint}")
    if sha256_file(weights) != done["sha256"]:
        raise InputError(f"{weights}: sha256 differs from {folder / DONE} (replaced or "
                         f"corrupted); {hint}")
    return done


def _load_state_file(p: Path) -> None:
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            f.keys()
    else:
        import torch

        # accelerate's own training state, loaded the way accelerate's load_state loads it
        torch.load(p, map_location="cpu", weights_only=False)


def _state_candidates(fold_dir: Path) -> list[Path]:
    # state/, then a state folder moved aside by an interrupted swap (atomic_path's .old-<pid>)
    return [fold_dir / STATE, *sorted(fold_dir.glob(f"{STATE}.old*"))]


def find_state(fold_dir: Path) -> Path | None:
    """The last complete saved state of a fold (``state/``, put back from ``state.old-*`` if
    a swap was interrupted); half-written ``state.tmp-*`` folders are removed."""
    for p in fold_dir.glob(f"{STATE}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in _state_candidates(fold_dir):
        if (p / TRAINER_STATE).is_file():
            if p.name != STATE:
                shutil.rmtree(fold_dir / STATE, ignore_errors=True)
                os.replace(p, fold_dir / STATE)
            return fold_dir / STATE
    return None


def read_trainer(state: Path) -> dict:
    path = state / TRAINER_STATE
    try:
        t = json.loads(path.read_text())
        if not isinstance(t, dict) or not isinstance(t.get("epoch"), int):
            raise ValueError("no integer 'epoch'")
        return t
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unreadable saved training state ({e}); delete {state} to "
                         f"train the fold from epoch 0") from None


def write_trainer(state: Path, trainer: dict) -> None:
    (state / TRAINER_STATE).write_text(json.dumps(trainer, indent=2) + "\n")


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
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        d = json.loads(path.read_text())
        k, folds = int(d["k"]), d["folds"]
        if len(folds) != k or [f["fold"] for f in folds] != list(range(k)):
            raise InputError(f"{path}: expected folds 0..{k - 1}")
        seen: set[int] = set()
        for f in folds:
            val = set(f["val_ids"])
            if seen & val:
                raise InputError(f"{path}: fold {f['fold']} shares validation ids with another fold")
            seen |= val
            f["train_ids"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed splits file ({type(e).__name__}: {e})") from None
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
