"""Out-of-fold scores: the ensemble file of a run, collected once from its finished folds.

`collect` reads every finished fold of a recipe (weights checked against their
done sha256), scores each member and the members' average on the out-of-fold
predictions, and returns the `records.EnsembleSpec` that `RunFolder.write_ensemble`
stores; train-folds calls it under the run folder's lock.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import NUM_CLASSES
from ._progress import pct
from .config import Recipe
from .errors import InputError
from .metrics import labeled_argmax, round_score
from .records import EnsembleSpec, FoldSpec, MemberSpec
from .runfolder import OOF, RunFolder, fold_name, read_oof


def oof_scores(run: RunFolder, split, splits: dict, members: list[str]) -> dict:
    """Course mIoU over all out-of-fold pixels, per member and for their average (ensemble).

    One confusion matrix per member over every validation image of every fold
    (each training image is out-of-fold exactly once); the ensemble averages the
    members' softmax with weight 1. Predictions are the argmax over classes 1..4,
    as submissions are (`metrics.labeled_argmax`).
    """
    from .metrics import class_iou, confusion_matrix, course_miou

    pos = {int(i): p for p, i in enumerate(split.ids)}
    cms = {m: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64) for m in members}
    ens = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for fold in range(splits["k"]):
        total = None
        truth = None
        for m in members:
            path = run.fold_dir(m, fold) / OOF
            ids, probs = read_oof(path)
            if truth is None:
                rows = np.array([pos[int(i)] for i in ids])
                truth = split.masks[rows]
                first_ids = ids
            elif not np.array_equal(ids, first_ids):
                raise InputError(f"{path}: its ids differ from the other members' fold {fold}")
            cms[m] += confusion_matrix(labeled_argmax(probs), truth)
            p32 = probs.astype(np.float32)
            total = p32 if total is None else total + p32
        if total is not None:
            ens += confusion_matrix(labeled_argmax(total), truth)

    def score(cm):
        return round_score(course_miou(cm))

    def ious(cm):
        return [round_score(v) for v in class_iou(cm)]

    return {"members": {m: {"oof_miou": score(cm), "oof_iou": ious(cm)} for m, cm in cms.items()},
            "ensemble": {"oof_miou": score(ens) if members else None,
                         "oof_iou": ious(ens) if members else None}}


def collect(run: RunFolder, recipe: Recipe, split, splits: dict,
            data: Path | None = None) -> EnsembleSpec:
    """The ensemble file of `run` from its finished folds (weights checked)."""
    members = []
    complete = []
    for m in recipe.members:
        folds = []
        for k in range(recipe.folds):
            done = run.verify_fold(m.name, k)
            if done is not None:
                folds.append(FoldSpec(k, fold_name(m.name, k), done.sha256, done.val_miou,
                                      done.best_epoch, done.epochs, done.epochs_run))
        if folds:
            members.append(MemberSpec(m.name, 1.0, tuple(folds)))
            if len(folds) == recipe.folds:
                complete.append(m.name)
    scores = oof_scores(run, split, splits, complete)
    members = [dataclasses.replace(e, oof_miou=s["oof_miou"], oof_iou=tuple(s["oof_iou"]))
               if (s := scores["members"].get(e.name)) else e for e in members]
    ens = scores["ensemble"]
    return EnsembleSpec(
        name=run.path.name, recipe=recipe.name, k=recipe.folds, seed=recipe.seed,
        data=str(data) if data is not None else None, members=tuple(members),
        oof_miou_ensemble=ens["oof_miou"],
        oof_iou_ensemble=None if ens["oof_iou"] is None else tuple(ens["oof_iou"]),
        selected=tuple(complete or [e.name for e in members]))


def same_folds(run: RunFolder, ens: EnsembleSpec) -> bool:
    """True if the run's ensemble file already lists exactly these members, folds and weights."""
    def key(e: EnsembleSpec):
        return sorted((m.name, f.fold, f.sha256) for m in e.members for f in m.folds)
    try:
        old = run.read_ensemble()
    except InputError:
        return False
    return old.recipe == ens.recipe and key(old) == key(ens)


def summary_table(ens: EnsembleSpec):
    """A rich table: val mIoU per member and fold, OOF mIoU per member and of the ensemble (x100)."""
    from rich.table import Table

    k = ens.k
    t = Table(title=f"{ens.name}: course mIoU x100 (recipe {ens.recipe})", header_style="bold")
    t.add_column("member")
    for f in range(k):
        t.add_column(f"fold {f}", justify="right")
    t.add_column("OOF", justify="right")

    for m in ens.members:
        by = {f.fold: f.val_miou for f in m.folds}
        t.add_row(m.name, *[pct(by.get(f)) if f in by else "." for f in range(k)],
                  pct(m.oof_miou))
    t.add_row("ensemble", *[""] * k, pct(ens.oof_miou_ensemble), style="bold")
    return t
