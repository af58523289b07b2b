"""Temperature scaling fitted on the out-of-fold predictions (Guo et al. 2017).

A network's softmax is often over-confident. Temperature scaling divides the
logits by one number T > 0 (T > 1 softens, T < 1 sharpens) and keeps every
argmax. The out-of-fold files hold probabilities, not logits; ln p equals the
logits up to a per-pixel constant, which the softmax ignores, so
``softmax(ln p / T)`` is exactly ``softmax(logits / T)`` (`apply_temperature`).

T is fitted by minimising the NLL over labeled pixels of the probabilities
renormalised over classes 1..4 (the definition `metrics.CalibrationMeter` scores). NLL is convex in beta = 1/T (a
log-sum-exp of a linear function of beta minus a linear term), so a safeguarded
Newton iteration on beta (bracketed, bisection when Newton leaves the bracket)
finds the exact minimum; each iteration is one streamed pass over the data,
every problem (each member and the ensemble) in the same pass. Memory is bounded
by one chunk of images.

Two candidates are fitted (`calibrate_into`): one T per member (each fold model's
softmax sharpened or softened before the weighted average) and one T for the
ensemble (applied to the weighted average). The one with the lower out-of-fold NLL
of the ensemble is applied; both are recorded in the ensemble file.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .data import load_split
from .errors import InputError
from .metrics import PROB_FLOOR, CalibrationMeter, confusion_matrix, course_miou, labeled_argmax
from .records import APPLIED, Calibration, EnsembleSpec, FoldSpec
from .runfolder import LOCK_WAIT, OOF, RunFolder, data_fingerprint, oof_chunks

#: the interval searched for T
T_MIN, T_MAX = 0.05, 20.0
#: relative change of 1/T below which the Newton iteration stops
TOLERANCE = 1e-6
MAX_PASSES = 60


def apply_temperature(probs: torch.Tensor, temperature: float,
                      floor: float | None = None) -> torch.Tensor:
    """softmax(ln p / T) over dim 1: the probabilities of the logits divided by T.

    Shape: probs (B, C, ...) -> float32, same shape. ``floor`` (default: the smallest
    normal float32) keeps ln finite for probabilities that underflowed to 0.
    T == 1 returns ``probs`` itself.
    """
    if temperature == 1.0:
        return probs
    floor = torch.finfo(torch.float32).tiny if floor is None else floor
    lp = probs.float().clamp_min(floor).log_().div_(temperature)
    return torch.softmax(lp, dim=1)


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class TemperatureFit:
    """One fitted temperature: NLL (nats per labeled pixel) at T = 1 and at the fit."""

    temperature: float
    nll_before: float
    nll_after: float
    pixels: int
    passes: int
    at_bound: bool  # the minimum lies at T_MIN or T_MAX (or beyond)

    def to_json(self) -> dict:
        return {"temperature": round(self.temperature, 6), "nll_before": round(self.nll_before, 6),
                "nll_after": round(self.nll_after, 6), "pixels": self.pixels,
                "passes": self.passes, "at_bound": self.at_bound}


class _Search:
    """Safeguarded Newton on beta = 1/T for one convex NLL(beta)."""

    def __init__(self):
        self.lo, self.hi = 1 / T_MAX, 1 / T_MIN
        self.lo_hard = self.hi_hard = True  # an end not yet evaluated: the search bound
        self.beta, self.done, self.passes = 1.0, False, 0
        self.nll0 = self.nll = math.nan

    def update(self, nll: float, g: float, h: float) -> None:
        """NLL, dNLL/dbeta and d2NLL/dbeta2 (means over pixels) at the current beta."""
        self.passes += 1
        self.nll0 = nll if self.passes == 1 else self.nll0
        self.nll = nll
        if g > 0:
            self.hi, self.hi_hard = self.beta, False
        else:
            self.lo, self.lo_hard = self.beta, False
        cand = self.beta - g / h if h > 0 else (math.inf if g < 0 else -math.inf)
        if cand >= self.hi:
            cand = self.hi if self.hi_hard else 0.5 * (self.beta + self.hi)
        elif cand <= self.lo:
            cand = self.lo if self.lo_hard else 0.5 * (self.beta + self.lo)
        if abs(cand - self.beta) <= TOLERANCE * self.beta or self.passes >= MAX_PASSES:
            self.done = True  # beta, already evaluated, is the answer
        else:
            self.beta = cand

    def result(self, pixels: int) -> TemperatureFit:
        edge = min(abs(self.beta - 1 / T_MAX), abs(self.beta - 1 / T_MIN)) <= TOLERANCE * self.beta
        return TemperatureFit(1 / self.beta, self.nll0, self.nll, pixels, self.passes, edge)


def _stats(probs: torch.Tensor, truth: torch.Tensor, beta: float) -> tuple[float, float, float]:
    """Sums over labeled pixels of NLL, its first and second derivative in beta.

    z = ln p over classes 1..4 without renormalising: NLL = lse(beta z) - beta z_y does
    not change when a pixel's z all move by one constant, so neither do its derivatives.
    Every pixel is computed and the unlabeled ones weighted 0 (cheaper than selecting).
    """
    w = (truth > 0).to(probs.device, torch.float32)
    y = (truth.to(probs.device).long() - 1).clamp_min_(0)
    z = probs[:, 1:].float().clamp_min(PROB_FLOOR).log_()  # (B, 4, H, W), a new tensor
    zy = z.gather(1, y[:, None])[:, 0]
    s = z * beta
    top = torch.maximum(torch.maximum(s[:, 0], s[:, 1]), torch.maximum(s[:, 2], s[:, 3]))
    e = s.sub_(top[:, None]).exp_()  # softmax(beta z) * total
    total = e.sum(1)
    ez = e.mul_(z)
    m1 = ez.sum(1).div_(total)  # E_q[z]
    m2 = ez.mul_(z).sum(1).div_(total)  # E_q[z^2]
    lse = total.log_().add_(top)
    return (float(((lse - beta * zy) * w).sum(dtype=torch.float64)),
            float(((m1 - zy) * w).sum(dtype=torch.float64)),
            float(((m2 - m1 * m1) * w).sum(dtype=torch.float64)))


def fit_temperatures(passes: Callable[[], Iterable[tuple[dict, torch.Tensor]]],
                     ) -> dict[Hashable, TemperatureFit]:
    """Fit one temperature per key by minimising NLL on labeled pixels.

    ``passes()`` returns a fresh iterator of (key -> probs (B, 5, H, W), truth (B, H, W)
    integer labels); every key gets its own T. It is called once per Newton pass.
    """
    search: dict[Hashable, _Search] = {}
    pixels: dict[Hashable, int] = {}
    while not search or not all(s.done for s in search.values()):
        sums: dict[Hashable, list[float]] = {}
        for chunk, truth in passes():
            truth = torch.as_tensor(truth)
            n = int((truth > 0).sum())
            seen: dict[tuple, tuple[float, float, float]] = {}
            for key, probs in chunk.items():
                s = search.setdefault(key, _Search())
                if s.done:
                    continue
                acc = sums.setdefault(key, [0.0, 0.0, 0.0, 0])
                at = (id(probs), s.beta)  # one member alone: it is the ensemble, count once
                if at not in seen:
                    seen[at] = _stats(torch.as_tensor(probs), truth, s.beta)
                for i, v in enumerate(seen[at]):
                    acc[i] += v
                acc[3] += n
        if not search:
            raise InputError("no out-of-fold predictions to fit a temperature on")
        for key, (nll, g, h, n) in sums.items():
            if n == 0:
                raise InputError("no labeled pixel (truth 1..4) to fit a temperature on")
            pixels[key] = n
            search[key].update(nll / n, g / n, h / n)
    return {k: s.result(pixels[k]) for k, s in search.items()}


# --------------------------------------------------------------------------- a run's OOF files

_ENSEMBLE = ("ensemble",)  # the fit's key for the weighted average (a member may be named so)


def chosen_weights(spec: EnsembleSpec) -> dict[str, float]:
    """member -> weight share (sums to 1) of the members an ensemble file selects, as the
    ensemble loader picks them: "selected" (else all), weight > 0."""
    by_name = spec.by_name
    names = [n for n in dict.fromkeys(spec.chosen) if n in by_name]
    w = {n: float(by_name[n].weight) for n in names}
    w = {n: v for n, v in w.items() if v > 0}
    total = sum(w.values())
    if not w:
        raise InputError("no member with weight > 0 to calibrate")
    return {n: v / total for n, v in w.items()}


def _fold_entries(spec: EnsembleSpec, names: list[str], where) -> dict[int, dict[str, FoldSpec]]:
    """fold -> member -> its ensemble-file fold entry; every member must have the same folds."""
    by_name = spec.by_name
    folds = {n: {f.fold: f for f in by_name[n].folds} for n in names}
    first = sorted(folds[names[0]])
    for n in names:
        if sorted(folds[n]) != first or not first:
            raise InputError(f"{where}: member {n!r} has folds {sorted(folds[n])}, "
                             f"{names[0]!r} {first}; calibration needs the same folds for every "
                             "member")
    return {k: {n: folds[n][k] for n in names} for k in first}


def oof_passes(run, spec: EnsembleSpec, weights: dict[str, float], split, rows: int = 64):
    """``fit_temperatures``' source: a function giving a fresh stream of out-of-fold chunks,
    ({("member", name): probs, ("ensemble",): weighted average}, truth), all float32 tensors."""
    names = list(weights)
    entries = _fold_entries(spec, names, run.ensemble)
    row = {int(i): r for r, i in enumerate(split.ids)}

    def stream():
        for fold, by_member in entries.items():
            paths = [run.fold_path(n, by_member[n]) / OOF for n in names]
            for parts in itertools.zip_longest(*(oof_chunks(p, rows) for p in paths)):
                if any(p is None or not np.array_equal(p[0], parts[0][0]) for p in parts):
                    raise InputError(f"{paths[0].parent.parent}: fold {fold}'s out-of-fold images "
                                     "differ between members")
                try:
                    truth = torch.from_numpy(split.masks[[row[int(i)] for i in parts[0][0]]])
                except KeyError as e:
                    raise InputError(f"{paths[0]}: out-of-fold id {e} is not in the train "
                                     "split") from None
                chunk = {("member", n): torch.from_numpy(p[1]).float()
                         for n, p in zip(names, parts, strict=True)}
                chunk[_ENSEMBLE] = (chunk["member", names[0]] if len(names) == 1 else
                                    sum(weights[n] * chunk["member", n] for n in names))
                yield chunk, truth
    return stream


def _score_candidates(passes, weights: dict[str, float], fits: dict) -> dict[str, dict]:
    """OOF NLL, ECE and mIoU of the ensemble: uncalibrated, per-member T, ensemble T."""
    meters = {c: CalibrationMeter() for c in APPLIED}
    cms = {c: np.zeros((5, 5), np.int64) for c in APPLIED}
    for chunk, truth in passes():
        cands = {"none": chunk[_ENSEMBLE],
                 "members": sum(w * apply_temperature(chunk["member", n],
                                                      fits["member", n].temperature, PROB_FLOOR)
                                for n, w in weights.items()),
                 "ensemble": apply_temperature(chunk[_ENSEMBLE], fits[_ENSEMBLE].temperature,
                                               PROB_FLOOR)}
        for c, p in cands.items():
            meters[c].update(p, truth)
            cms[c] += confusion_matrix(labeled_argmax(p), truth)
    out = {}
    for c in APPLIED:
        out[c] = {**meters[c].to_json(), "miou": round(course_miou(cms[c]), 6)}
    return out


def calibrate_into(run, spec: EnsembleSpec, split) -> Calibration:
    """Fit both candidates on a run's out-of-fold files and choose by OOF NLL of the ensemble.

    ``run``: the RunFolder; ``spec``: its ensemble file (weights as they are now);
    ``split``: the train split (ids, masks) the run was made from.
    """
    weights = chosen_weights(spec)
    passes = oof_passes(run, spec, weights, split)
    fits = fit_temperatures(passes)
    oof = _score_candidates(passes, weights, fits)
    applied = "members" if oof["members"]["nll"] <= oof["ensemble"]["nll"] else "ensemble"
    evidence = {
        "method": "temperature scaling fitted on the out-of-fold probabilities: NLL over "
                  "labeled pixels of classes 1-4 (metrics.CalibrationMeter)",
        "chosen_by": "lower out-of-fold NLL of the ensemble",
        "weights": {n: round(w, 6) for n, w in weights.items()},
        "fits": {"ensemble": fits[_ENSEMBLE].to_json(),
                 "members": {n: fits["member", n].to_json() for n in weights}},
        "oof": oof}
    return Calibration(applied, round(fits[_ENSEMBLE].temperature, 6),
                       {n: round(fits["member", n].temperature, 6) for n in weights}, evidence)


def calibrate_run(run_dir, data=None) -> Calibration:
    """Fit the temperatures of a run folder on its out-of-fold files and store them in its
    ensemble file (under the run's lock). ``data``: the run's shards (default: recorded)."""
    run = RunFolder(run_dir)
    spec = run.read_ensemble()
    if data is None:
        if not spec.data:
            raise InputError(f"{run.ensemble}: no data folder recorded; pass --data")
        data = spec.data
    split = load_split(Path(data), "train")
    run.check_data(data_fingerprint(data))
    run.check_writable()
    cal = calibrate_into(run, spec, split)  # long: outside the lock, checked under it
    with run.lock(LOCK_WAIT):
        now = run.read_ensemble()
        if _fitted_on(now) != _fitted_on(spec):
            raise InputError(f"{run.ensemble}: its members, weights or folds changed while "
                             "calibrating; run calibrate again")
        run.write_ensemble(replace(now, calibration=cal))
    return cal


def _fitted_on(spec: EnsembleSpec):
    """What a calibration depends on: selection, members, weights, fold weights."""
    return (spec.selected, [(m.name, m.weight, [(f.fold, f.path, f.sha256) for f in m.folds])
                            for m in spec.members])
