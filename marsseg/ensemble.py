"""The loaded ensemble: the fold networks a run folder's ensemble file selects, with weights.

An ensemble is every fold model of the selected members of a run folder (its
ensemble file, read by `runfolder.RunFolder`); each fold is rebuilt from its own
folder alone (config + weights via ``load_pretrained``). A member's
weight is shared equally by its folds, so a 5-fold member and a 3-fold member
with the same weight count the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ._io import sha256_file
from .errors import InputError
from .folds import ALL
from .records import Calibration, FoldSpec
from .runfolder import CONFIG, DONE, WEIGHTS, RunFolder, fold_name, verify_fold_folder


@dataclass
class FoldModel:
    """One fold network of one member and its share of the ensemble (shares sum to 1)."""

    member: str
    fold: int
    weight: float
    model: nn.Module
    path: Path
    sha256: str | None = None  # of the weights, as recorded in the ensemble file (if any)
    temperature: float = 1.0   # its logits are divided by this before the softmax (calibration)

    @property
    def name(self) -> str:
        """``member/fold_k``; a model trained on every image (distill --all) keeps the name
        of its folder, ``member/fold_all``, not the fold number it is filed under."""
        every = fold_name(self.member, ALL)
        return every if self.path.name == Path(every).name else fold_name(self.member, self.fold)


@dataclass
class Ensemble:
    """The fold models of a run folder, each with its normalised weight."""

    run_dir: Path
    models: list[FoldModel] = field(default_factory=list)
    temperature: float = 1.0       # applied to the weighted average (calibration "ensemble")
    calibration: str = "none"      # which temperatures apply: none | members | ensemble

    def __len__(self) -> int:
        return len(self.models)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def subset(self, folds: Sequence[int]) -> Ensemble:
        """The fold models of ``folds`` (the same loaded networks), weights renormalised to 1."""
        chosen = [m for m in self.models if m.fold in set(folds)]
        total = sum(m.weight for m in chosen)
        if not chosen or total <= 0:
            raise InputError(f"{self.run_dir}: no fold models for fold(s) {list(folds)}")
        return Ensemble(self.run_dir, [dataclasses.replace(m, weight=m.weight / total)
                                       for m in chosen])


def _load_fold(folder: Path, sha256: str | None, map_location) -> nn.Module:
    from .models.registry import load_pretrained

    weights = folder / WEIGHTS
    if not folder.is_dir():
        raise InputError(f"{folder}: fold folder is missing")
    if not weights.is_file():
        raise InputError(f"{weights}: weight file is missing")
    if sha256 and sha256_file(weights) != sha256:
        raise InputError(f"{weights}: sha256 differs from the run's ensemble file "
                         "(corrupted or replaced)")
    try:
        model = load_pretrained(folder, map_location=map_location)
    except InputError:
        raise
    except Exception as e:  # a corrupt file must never surface as a traceback
        raise InputError(f"{weights}: cannot load weights ({type(e).__name__}: {e})") from None
    return model.eval()


def load_ensemble(run_dir: str | os.PathLike, members: Sequence[str] | None = None,
                  folds: Sequence[int] | None = None, map_location="cpu",
                  verify: bool = True, calibrated: bool = True) -> Ensemble:
    """Load the fold models of a run folder.

    ``members`` defaults to the ensemble file's "selected" (else all members);
    ``folds`` filters fold numbers. A single fold folder (config + weights, no
    ensemble file) loads as a one-model ensemble.
    ``verify`` checks each weight file against the sha256 in the ensemble file.
    ``calibrated``: the temperatures of the ensemble file's calibration apply (a file
    without one, or False: T = 1).
    """
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    if run.is_fold_folder():
        if verify and verify_fold_folder(run_dir, str(run_dir)) is None:
            raise InputError(f"{run_dir / DONE}: missing, so {run_dir / WEIGHTS} cannot be "
                             "checked (not a finished fold folder)")
        model = _load_fold(run_dir, None, map_location)
        cfg = json.loads((run_dir / CONFIG).read_text())
        return Ensemble(run_dir, [FoldModel(str(cfg.get("member", run_dir.name)),
                                            int(cfg.get("fold", 0)), 1.0, model, run_dir)])
    spec = run.read_ensemble()
    cal = (spec.calibration or Calibration()) if calibrated else Calibration()
    by_name = spec.by_name
    if members:
        unknown = [m for m in members if m not in by_name]
        if unknown:
            raise InputError(f"unknown member(s) {', '.join(unknown)}; "
                             f"{run_dir} has {', '.join(map(str, by_name))}")
        chosen = list(members)
    else:
        chosen = spec.chosen
        missing = [m for m in chosen if m not in by_name]
        if missing:
            raise InputError(f"{run.ensemble}: selected member(s) "
                             f"{', '.join(missing)} not in members")
    plan: list[tuple[str, float, FoldSpec]] = []
    for name in chosen:
        m = by_name[name]
        fl = [f for f in m.folds if folds is None or f.fold in set(folds)]
        w = float(m.weight)  # finite and >= 0: checked by read_ensemble
        if w == 0:  # deselected by `select`: no point running it
            continue
        plan += [(name, w / len(fl), f) for f in fl]
    if folds is not None:
        have = {f.fold for _, _, f in plan}
        absent = sorted(set(folds) - have)
        if absent:
            raise InputError(f"fold(s) {absent} not found for member(s) {', '.join(chosen)}")
    total = sum(w for _, w, _ in plan)
    if not plan or total <= 0:
        raise InputError(f"{run_dir}: no fold models selected")
    out = Ensemble(run_dir, temperature=cal.ensemble_temperature, calibration=cal.applied)
    for name, w, f in plan:
        folder = run.fold_path(name, f)
        if verify and not f.sha256:
            raise InputError(f"{run.ensemble}: {name} fold {f.fold} has no 'sha256', so its "
                             "weights cannot be checked; restore it (train-folds writes it)")
        model = _load_fold(folder, f.sha256 if verify else None, map_location)
        out.models.append(FoldModel(name, f.fold, w / total, model, folder, f.sha256,
                                    cal.member_temperature(name)))
    return out
