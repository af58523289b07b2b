"""The JSON records of a run folder and their checks; `runfolder` reads and writes the files.

A record that crosses modules is a frozen dataclass: `to_json` gives exactly the dict
that is written (key order, optional keys omitted as they always were), `from_json`
checks each value's type and fills the defaults of keys older files lack. A wrong
type is an InputError naming the file and the key. ``ensemble.json`` (`EnsembleSpec`, its
`MemberSpec`, `FoldSpec` and `Calibration`) is edited by hand too: its records also keep
the key order and the keys they do not know, so a file read and written unchanged keeps its
bytes. `check_splits` checks ``splits.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import ClassVar

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

    `workers` is written only when > 1, `sampling` only with a sampler (what it drew
    from) and `reused_from` only for a fold adopted by train-folds --reuse (the run folder,
    fold and weights' sha256 it was copied from; the other keys are the training's own);
    older files lacking a key load with its default. Only `sha256` is required.
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
    reused_from: dict | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if d["val_iou"] is not None:
            d["val_iou"] = list(d["val_iou"])
        if self.workers == 1:
            del d["workers"]
        for key in ("sampling", "reused_from"):
            if d[key] is None:
                del d[key]
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
               "sampling": (dict, type(None)), "reused_from": (dict, type(None))}


# --- ensemble.json: hand-editable, so key order and unknown keys survive a rewrite ----------

_LAYOUT = {"repr": False, "compare": False}
APPLIED = ("none", "members", "ensemble")  # what `Calibration.applied` may name


class _Keyed:
    """What the ensemble file's records share: `to_json` writes the keys in the order they
    were read (`key_order`; unknown keys, kept in `_EXTRA`, in their place), then the keys a
    record gained since (a field unlike its default) in field order. A record made in code
    (empty `key_order`) writes its `_ALWAYS` keys too, as the writers always did."""

    _ALWAYS: ClassVar[tuple[str, ...]] = ()
    _EXTRA: ClassVar[str] = "unknown"

    def to_json(self) -> dict:
        fields = {f.name: f for f in dataclasses.fields(self)
                  if f.name not in ("key_order", self._EXTRA)}
        extra, order = getattr(self, self._EXTRA), self.key_order

        def shown(f) -> bool:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                return True
            return (not order and f.name in self._ALWAYS) or getattr(self, f.name) != default

        out = {}
        for k in order:
            if k in fields:
                out[k] = _plain(getattr(self, k))
            elif k in extra:
                out[k] = copy.deepcopy(extra[k])
        for name, f in fields.items():
            if name not in out and shown(f):
                out[name] = _plain(getattr(self, name))
        for k, v in extra.items():
            out.setdefault(k, copy.deepcopy(v))
        return out


def _plain(v):
    """A field's JSON value: records as their dicts, tuples as lists, containers copied."""
    if isinstance(v, _Keyed):
        return v.to_json()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return copy.deepcopy(v) if isinstance(v, dict) else v


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(d: dict, key: str, ok, expected: str, path, at: str = "") -> None:
    """``d[key]``, when present, passes `ok`; else an InputError naming `path` and the key."""
    if key in d and not ok(d[key]):
        raise InputError(f"{path}: {at}{key} must be {expected}, got {d[key]!r}")


def _opt_number(v) -> bool:
    return v is None or _finite(v)


def _opt_int(v) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _opt_scores(v) -> bool:  # per-class IoU: null or a list of numbers / nulls
    return v is None or (isinstance(v, list) and all(_opt_number(x) for x in v))


def _split(cls, d: dict, values: dict) -> _Keyed:
    """A record of `values` that keeps `d`'s key order and its keys no field knows."""
    known = {f.name for f in dataclasses.fields(cls)} - {"key_order", cls._EXTRA}
    return cls(**values, key_order=tuple(d), **{cls._EXTRA: {k: v for k, v in d.items()
                                                             if k not in known}})


def _positive(v, where: str):
    if not _finite(v) or v <= 0:
        raise InputError(f"{where} must be a finite number > 0, got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class Calibration(_Keyed):
    """The ensemble file's "calibration": which temperatures apply, and the OOF evidence.

    ``applied``: "ensemble" (``temperature`` on the weighted average of the fold models),
    "members" (``members[name]`` on each fold model of that member before averaging) or
    "none" (T = 1, also what a file without the block means).
    """

    applied: str = "none"
    temperature: float = 1.0
    members: dict[str, float] = dataclasses.field(default_factory=dict)
    evidence: dict = dataclasses.field(default_factory=dict)  # OOF scores and fits, as written
    key_order: tuple[str, ...] = dataclasses.field(default=(), **_LAYOUT)
    _ALWAYS: ClassVar[tuple[str, ...]] = ("applied", "temperature", "members")
    _EXTRA: ClassVar[str] = "evidence"

    def member_temperature(self, member: str) -> float:
        return self.members.get(member, 1.0) if self.applied == "members" else 1.0

    @property
    def ensemble_temperature(self) -> float:
        return self.temperature if self.applied == "ensemble" else 1.0

    @classmethod
    def from_json(cls, d, where) -> Calibration:
        """Check and read the block (None: uncalibrated); ``where`` names the file in errors."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise InputError(f"{where}: 'calibration' must be an object")
        applied = d.get("applied", "none")
        if applied not in APPLIED:
            raise InputError(f"{where}: calibration.applied must be one of {', '.join(APPLIED)}, "
                             f"got {applied!r}")
        t = _positive(d.get("temperature", 1.0), f"{where}: calibration.temperature")
        members = d.get("members", {})
        if not isinstance(members, dict):
            raise InputError(f"{where}: calibration.members must be an object")
        members = {str(k): _positive(v, f"{where}: calibration.members.{k}")
                   for k, v in members.items()}
        return _split(cls, d, {"applied": applied, "temperature": t, "members": members})


@dataclasses.dataclass(frozen=True)
class FoldSpec(_Keyed):
    """One fold model of a member: where it lives and what done.json said of it."""

    fold: int
    path: str | None = None  # inside the run folder; None: the standard place
    sha256: str | None = None  # of the weights; required where weights are loaded
    val_miou: float | None = None
    best_epoch: int | None = None
    epochs: int | None = None
    epochs_run: int | None = None
    trained_on: str | None = None  # "all": a distilled student trained on every image
    unknown: dict = dataclasses.field(default_factory=dict)
    key_order: tuple[str, ...] = dataclasses.field(default=(), **_LAYOUT)
    _ALWAYS: ClassVar[tuple[str, ...]] = ("fold", "path", "sha256", "val_miou", "best_epoch",
                                          "epochs", "epochs_run")

    @classmethod
    def from_json(cls, f, path, at: str, member: str) -> FoldSpec:
        if not isinstance(f, dict) or not isinstance(f.get("fold"), int) \
                or isinstance(f.get("fold"), bool) or f["fold"] < 0:
            raise InputError(f"{path}: {at}.fold must be an integer >= 0")
        p = f.get("path")
        if p is not None and (not isinstance(p, str)
                              or not all(valid_name(q) for q in p.split("/"))):
            raise InputError(f"{path}: {at}.path must be a path inside the run folder, got {p!r}")
        sha = f.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _SHA_RE.fullmatch(sha)):
            raise InputError(f"{path}: {at}.sha256 ({member} fold {f['fold']}) must be the "
                             "weights' sha256 (64 hex digits); without it they cannot be checked")
        _check(f, "val_miou", _opt_number, "a finite number or null", path, at + ".")
        for key in ("best_epoch", "epochs", "epochs_run"):
            _check(f, key, _opt_int, "an integer or null", path, at + ".")
        _check(f, "trained_on", lambda v: v is None or isinstance(v, str), "a string", path,
               at + ".")
        return _split(cls, f, {k: f[k] for k in _FOLD_KEYS if k in f})


_FOLD_KEYS = ("fold", "path", "sha256", "val_miou", "best_epoch", "epochs", "epochs_run",
              "trained_on")


@dataclasses.dataclass(frozen=True)
class MemberSpec(_Keyed):
    """One member of the ensemble: its weight (0: deselected), fold models and OOF scores."""

    name: str
    weight: float = 1.0
    folds: tuple[FoldSpec, ...] = ()
    oof_miou: float | None = None
    oof_iou: tuple[float | None, ...] | None = None
    oof_miou_single: float | None = None  # its own OOF mIoU, as `select` scored it
    unknown: dict = dataclasses.field(default_factory=dict)
    key_order: tuple[str, ...] = dataclasses.field(default=(), **_LAYOUT)
    _ALWAYS: ClassVar[tuple[str, ...]] = ("name", "weight", "folds", "oof_miou", "oof_iou")

    @classmethod
    def from_json(cls, m, path, at: str) -> MemberSpec:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise InputError(f"{path}: {at}.name must be a non-empty string")
        name = m["name"]
        if not valid_name(name):
            raise InputError(f"{path}: {at}.name {name!r} is not a member name (letters, "
                             "digits, '_', '-', '.'; it names a folder of the run)")
        w = m.get("weight", 1.0)
        if not _finite(w) or w < 0:
            raise InputError(f"{path}: {at}.weight ({name}) must be a finite number >= 0, "
                             f"got {w!r}")
        folds = m.get("folds", [])
        if not isinstance(folds, list):
            raise InputError(f"{path}: {at}.folds must be a list")
        for key in ("oof_miou", "oof_miou_single"):
            _check(m, key, _opt_number, "a finite number or null", path, at + ".")
        _check(m, "oof_iou", _opt_scores, "a list of numbers or null", path, at + ".")
        values = {k: m[k] for k in ("name", "weight", "oof_miou", "oof_miou_single") if k in m}
        values["folds"] = tuple(FoldSpec.from_json(f, path, f"{at}.folds[{j}]", name)
                                for j, f in enumerate(folds))
        if m.get("oof_iou") is not None:
            values["oof_iou"] = tuple(m["oof_iou"])
        return _split(cls, m, values)


@dataclasses.dataclass(frozen=True)
class EnsembleSpec(_Keyed):
    """``ensemble.json``: the members of a run folder, their folds and weights, the selection
    and calibration. Users edit the file by hand: `from_json` checks every key a reader
    relies on (an InputError naming the file and key), `to_json` keeps key order and keys it
    does not know. Edit with `dataclasses.replace`."""

    format_version: int = 1
    name: str | None = None
    recipe: str | None = None
    k: int | None = None
    seed: int | None = None
    data: str | None = None  # the shard folder the run was trained on
    members: tuple[MemberSpec, ...] = ()
    oof_miou_ensemble: float | None = None
    oof_iou_ensemble: tuple[float | None, ...] | None = None
    selected: tuple[str, ...] | None = None  # member names predict uses (None/empty: all)
    distilled_from: dict | None = None  # distill: the teacher and the distillation's options
    heldout: dict | None = None  # distill: student and teacher on the teacher's fold 0
    selection: dict | None = None  # select: method, OOF mIoU, greedy trace
    calibration: Calibration | None = None
    unknown: dict = dataclasses.field(default_factory=dict)
    key_order: tuple[str, ...] = dataclasses.field(default=(), **_LAYOUT)
    _ALWAYS: ClassVar[tuple[str, ...]] = ("format_version", "name", "recipe", "k", "seed", "data",
                                          "members", "oof_miou_ensemble", "oof_iou_ensemble",
                                          "selected")

    @property
    def chosen(self) -> list[str]:
        """The member names in use: "selected", else every member."""
        return list(self.selected) if self.selected else [m.name for m in self.members]

    @property
    def by_name(self) -> dict[str, MemberSpec]:
        return {m.name: m for m in self.members}

    @property
    def oof_score(self) -> float | None:
        """The ensemble's OOF mIoU: the selection's where `select` weighted it."""
        return (self.selection or {}).get("oof_miou", self.oof_miou_ensemble)

    @classmethod
    def from_json(cls, d, path) -> EnsembleSpec:
        if not isinstance(d, dict) or not isinstance(d.get("members"), list):
            raise InputError(f"{path}: no 'members' list")
        members = tuple(MemberSpec.from_json(m, path, f"members[{i}]")
                        for i, m in enumerate(d["members"]))
        sel = d.get("selected")
        if sel is not None and (not isinstance(sel, list) or not all(isinstance(s, str) for s in sel)):
            raise InputError(f"{path}: 'selected' must be a list of member names")
        for key in ("format_version", "k", "seed"):
            _check(d, key, _opt_int, "an integer or null", path)
        for key in ("name", "recipe", "data"):
            _check(d, key, lambda v: v is None or isinstance(v, str), "a string or null", path)
        _check(d, "oof_miou_ensemble", _opt_number, "a finite number or null", path)
        _check(d, "oof_iou_ensemble", _opt_scores, "a list of numbers or null", path)
        for key in ("distilled_from", "heldout", "selection"):
            _check(d, key, lambda v: v is None or isinstance(v, dict), "an object or null", path)
        _check(d.get("selection") or {}, "oof_miou", _opt_number, "a finite number or null",
               path, "selection.")
        values = {k: d[k] for k in _TOP_KEYS if k in d}
        values["members"] = members
        if sel is not None:
            values["selected"] = tuple(sel)
        if d.get("oof_iou_ensemble") is not None:
            values["oof_iou_ensemble"] = tuple(d["oof_iou_ensemble"])
        if d.get("calibration") is not None:
            values["calibration"] = Calibration.from_json(d["calibration"], path)
        return _split(cls, d, values)


_TOP_KEYS = ("format_version", "name", "recipe", "k", "seed", "data", "oof_miou_ensemble",
             "distilled_from", "heldout", "selection")


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
