"""The JSON records of a run folder and their checks; `runfolder` reads and writes the files.

A record that crosses modules is a frozen dataclass: `to_json` gives exactly the dict
that is written (key order, optional keys omitted as they always were), `from_json`
checks each value's type and fills the defaults of keys older files lack. A wrong
type is an InputError naming the file and the key. `check_ensemble` and
`check_splits` check the hand-editable ``ensemble.json`` and ``splits.json``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from ._io import valid_name
from .errors import InputError

_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _kind_ok(v, kinds: tuple) -> bool:
    """`v` is one of `kinds` (types; float accepts int; bool is never an int or float)."""
    if isinstance(v, bool):
        return bool in kinds
    if float in kinds and isinstance(v, int):
        return True
    return any(k is not bool and isinstance(v, k) for k in kinds)


def typed(d: dict, key: str, kinds: tuple, default, path, what: str, hint: str = ""):
    """``d[key]`` checked against `kinds` (None allowed when in `kinds` as ``type(None)``);
    `default` when the key is absent. Wrong type = InputError naming `path` and `key`."""
    if key not in d:
        return default
    v = d[key]
    if not _kind_ok(v, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise InputError(f"{path}: malformed {what} ('{key}' is {v!r}, expected {names}){hint}")
    return float(v) if float in kinds and isinstance(v, int) and not isinstance(v, bool) else v


_NUM, _OPT_NUM = (float,), (float, type(None))


@dataclasses.dataclass(frozen=True)
class Done:
    """``done.json``: a finished fold, written last (its presence means the fold is finished).

    `workers` is written only when > 1 and `sampling` only with a sampler (what it drew
    from); older files lacking a key load with its default. Only `sha256` is required.
    """

    member: str = ""
    fold: int | str = 0  # a fold number or "all"
    recipe: str = ""
    best_epoch: int = -1
    val_miou: float | None = None
    val_iou: tuple[float | None, ...] | None = None
    epochs: int = 0
    epochs_run: int = 0
    stopped_early: bool = False
    n_train: int = 0
    n_train_filtered: int = 0
    n_val: int = 0
    n_pseudo: int = 0
    precision: str = ""
    device: str = ""
    workers: int = 1  # data-parallel workers of the fold
    train_seconds: float = 0.0
    sha256: str = ""
    seconds_this_attempt: float = 0.0
    sampling: dict | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if d["val_iou"] is not None:
            d["val_iou"] = list(d["val_iou"])
        if self.workers == 1:
            del d["workers"]
        if self.sampling is None:
            del d["sampling"]
        return d

    @classmethod
    def from_json(cls, d, path, hint: str = "") -> Done:
        """From a done.json dict read from `path`; unknown keys are ignored. A missing
        'sha256' or a wrong type is an InputError naming `path` and the key (then `hint`)."""
        hint = f"; {hint}" if hint else ""
        if not isinstance(d, dict) or not isinstance(d.get("sha256"), str):
            raise InputError(f"{path}: malformed done file (no 'sha256'){hint}")
        what = "done file"
        values = {f.name: typed(d, f.name, _DONE_KINDS[f.name], f.default, path, what, hint)
                  for f in dataclasses.fields(cls)}
        iou = values["val_iou"]
        if iou is not None:
            if not all(_kind_ok(v, _OPT_NUM) for v in iou):
                raise InputError(f"{path}: malformed {what} ('val_iou' holds a non-number){hint}")
            values["val_iou"] = tuple(iou)
        return cls(**values)


_DONE_KINDS = {"member": (str,), "fold": (int, str), "recipe": (str,), "best_epoch": (int,),
               "val_miou": _OPT_NUM, "val_iou": (list, type(None)), "epochs": (int,),
               "epochs_run": (int,), "stopped_early": (bool,), "n_train": (int,),
               "n_train_filtered": (int,), "n_val": (int,), "n_pseudo": (int,),
               "precision": (str,), "device": (str,), "workers": (int,),
               "train_seconds": _NUM, "sha256": (str,), "seconds_this_attempt": _NUM,
               "sampling": (dict, type(None))}


def check_ensemble(spec, path: Path) -> None:
    """Every key readers use: members[i].name, .weight (finite, >= 0), .folds[j].fold/.path."""
    if not isinstance(spec, dict) or not isinstance(spec.get("members"), list):
        raise InputError(f"{path}: no 'members' list")
    for i, m in enumerate(spec["members"]):
        key = f"members[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise InputError(f"{path}: {key}.name must be a non-empty string")
        if not valid_name(m["name"]):
            raise InputError(f"{path}: {key}.name {m['name']!r} is not a member name (letters, "
                             "digits, '_', '-', '.'; it names a folder of the run)")
        w = m.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise InputError(f"{path}: {key}.weight ({m['name']}) must be a finite number >= 0, "
                             f"got {w!r}")
        folds = m.get("folds", [])
        if not isinstance(folds, list):
            raise InputError(f"{path}: {key}.folds must be a list")
        for j, f in enumerate(folds):
            fk = f"{key}.folds[{j}]"
            if not isinstance(f, dict) or not isinstance(f.get("fold"), int) \
                    or isinstance(f.get("fold"), bool) or f["fold"] < 0:
                raise InputError(f"{path}: {fk}.fold must be an integer >= 0")
            p = f.get("path")
            if p is not None and (not isinstance(p, str)
                                  or not all(valid_name(q) for q in p.split("/"))):
                raise InputError(f"{path}: {fk}.path must be a path inside the run folder, got {p!r}")
            sha = f.get("sha256")  # required where weights are loaded (ensemble.load_ensemble)
            if sha is not None and (not isinstance(sha, str) or not _SHA_RE.fullmatch(sha)):
                raise InputError(f"{path}: {fk}.sha256 ({m['name']} fold {f['fold']}) must be the "
                                 "weights' sha256 (64 hex digits); without it they cannot be "
                                 "checked")
    sel = spec.get("selected")
    if sel is not None and (not isinstance(sel, list) or not all(isinstance(s, str) for s in sel)):
        raise InputError(f"{path}: 'selected' must be a list of member names")


def check_splits(d, path: Path) -> None:
    """A splits record: keys, one entry per fold 0..k-1, validation sets disjoint."""
    try:
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
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed splits file ({type(e).__name__}: {e})") from None
