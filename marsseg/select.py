"""Choose ensemble members and weights by out-of-fold score (Caruana et al. 2004).

nnU-Net picks its final configuration (or pair) by cross-validation score; we
generalise that to greedy forward selection with replacement over the members
of a run: start empty, repeatedly add the member whose inclusion gives the best
out-of-fold course mIoU of the weighted softmax average, stop when nothing
improves. A member picked twice gets twice the weight. The choice uses only the
out-of-fold predictions that train-folds wrote into the run folder, never test masks.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .metrics import class_iou, confusion_matrix, course_miou, labeled_argmax
from .records import EnsembleSpec, MemberSpec
from .runfolder import LOCK_WAIT, OOF, RunFolder, data_fingerprint, read_oof
from .temperature import Calibration, calibrate_into
from .tracking import log_group


@dataclass(frozen=True)
class Selection:
    weights: dict[str, float]      # member -> weight (sums to 1)
    oof_miou: float                # OOF course mIoU of the weighted ensemble
    single: dict[str, float]       # member -> its own OOF course mIoU
    trace: list[dict]              # one entry per greedy step
    calibration: Calibration | None = None  # the temperatures fitted for these weights


def load_oof(run: RunFolder, member: MemberSpec) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold softmax of one member (an ensemble file entry) over all its folds.

    Returns ids int64 (n,) sorted, probs float16 (n, 5, H, W).
    """
    ids, probs = [], []
    for fold in member.folds:
        i, p = read_oof(run.fold_path(member.name, fold) / OOF)
        ids.append(i)
        probs.append(p)
    if not ids:
        raise InputError(f"{run.ensemble}: member {member.name!r} has no folds")
    ids_a = np.concatenate(ids)
    order = np.argsort(ids_a, kind="stable")
    return ids_a[order], np.concatenate(probs)[order]


def _score(probs: np.ndarray, masks: np.ndarray, chunk: int = 256) -> tuple[float, np.ndarray]:
    """Course mIoU and per-class IoU of foreground argmax (classes 1-4), as submissions are made."""
    cm = np.zeros((5, 5), np.int64)
    for s in range(0, len(probs), chunk):
        pred = labeled_argmax(probs[s:s + chunk])
        cm += confusion_matrix(pred, masks[s:s + chunk])
    return course_miou(cm), class_iou(cm)


def select_members(oof: dict[str, np.ndarray], masks: np.ndarray, max_steps: int | None = None,
                   ) -> Selection:
    """Greedy forward selection with replacement on out-of-fold probabilities.

    oof: member -> float probs (n, 5, H, W) aligned with masks uint8 (n, H, W).
    """
    if not oof:
        raise InputError("no members with out-of-fold predictions to select from")
    names = sorted(oof)
    max_steps = max_steps or 2 * len(names)
    single = {m: _score(oof[m], masks)[0] for m in names}
    picks: list[str] = []
    total = None
    best = -1.0
    trace = []
    for step in range(max_steps):
        cand = {}
        for m in names:
            trial = oof[m].astype(np.float32) if total is None else total + oof[m]
            cand[m] = _score(trial, masks)[0]
        m_best = max(names, key=lambda m: (cand[m], -names.index(m)))
        if cand[m_best] <= best + 1e-6:
            break
        best = cand[m_best]
        picks.append(m_best)
        total = oof[m_best].astype(np.float32) if total is None else total + oof[m_best]
        trace.append({"step": step, "added": m_best, "oof_miou": best})
    counts = Counter(picks)
    weights = {m: counts[m] / len(picks) for m in names if counts[m]}
    return Selection(weights=weights, oof_miou=best, single=single, trace=trace)


def select_run(run_dir: Path, data: Path | None = None, max_steps: int | None = None
               ) -> Selection:
    """Select members of a run folder by OOF score and write the choice into its ensemble file,
    with the temperatures fitted for the chosen weights (`temperature.calibrate_into`).

    `data` defaults to the shard folder the run recorded; other data is refused.
    """
    from .data import load_split

    run = RunFolder(run_dir)
    ens = run.read_ensemble()
    if data is None:
        if not ens.data:
            raise InputError(f"{run.ensemble}: no data folder recorded; pass --data")
        data = Path(ens.data)
    split = load_split(Path(data), "train")  # first: what is wrong inside a shard is clearer
    run.check_data(data_fingerprint(data))  # also verifies the train shards
    run.check_writable()
    with run.lock(LOCK_WAIT):
        ens = run.read_ensemble()  # as it is now, under the lock
        sel = _select(run, ens, split, data, max_steps)
        ens = _with_selection(ens, sel)
        cal = calibrate_into(run, ens, split)  # for these weights
        run.write_ensemble(dataclasses.replace(ens, calibration=cal))
    log_group(run.path, {"select/oof_miou": sel.oof_miou,
                         **{f"select/oof_miou/{m}": v for m, v in sel.single.items()},
                         **{f"select/weight/{m}": w for m, w in sel.weights.items()}})
    return dataclasses.replace(sel, calibration=cal)


def _select(run: RunFolder, ens: EnsembleSpec, split, data: Path, max_steps: int | None
            ) -> Selection:
    row = {int(i): r for r, i in enumerate(split.ids)}
    oof, ref_ids = {}, None
    for member in ens.members:
        ids, probs = load_oof(run, member)
        if ref_ids is None:
            ref_ids = ids
        elif not np.array_equal(ids, ref_ids):
            raise InputError(f"{run.path}: member {member.name!r} covers other images than the "
                             "first member; selection needs the same folds for every member")
        oof[member.name] = probs
    try:
        masks = split.masks[[row[int(i)] for i in ref_ids]]
    except KeyError as e:
        raise InputError(f"{data}: out-of-fold id {e} is not in the train shards") from None
    return select_members(oof, masks, max_steps=max_steps)


def _with_selection(ens: EnsembleSpec, sel: Selection) -> EnsembleSpec:
    """`ens` with the selection in it: each member's weight (0: not picked) and own OOF mIoU,
    the selected names and the greedy trace."""
    members = tuple(dataclasses.replace(m, weight=sel.weights.get(m.name, 0.0),
                                        oof_miou_single=sel.single[m.name]) for m in ens.members)
    return dataclasses.replace(
        ens, members=members, selected=tuple(sorted(sel.weights)),
        selection={"method": "greedy forward selection with replacement (Caruana 2004)",
                   "oof_miou": sel.oof_miou, "trace": sel.trace})
