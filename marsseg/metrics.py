"""Confusion matrix, per-class IoU, pixel accuracy and the course mIoU.

The course scorer (DESIGN.md, "The metric") drops every pixel whose truth is 0,
builds ONE confusion matrix over all remaining pixels of the whole set, and
averages IoU over the classes whose union is non-zero. Class 0 can therefore
only enter the mean when it was predicted on a labeled pixel (its row is empty,
its column is not), and then its IoU is 0. Scores are fractions 0..1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import NUM_CLASSES
from .errors import InputError


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def labeled_argmax(scores):
    """Argmax over classes 1..4 of (B, 5, H, W) logits or probabilities (torch or numpy).

    Class 0 is "unlabeled": the course drops truth-0 pixels, so predicting 0 can only
    lower the score. Validation, out-of-fold scores, selection and submissions all
    use this argmax. Returns integer labels (B, H, W) in 1..4 (int64 / intp).
    """
    return scores[:, 1:].argmax(1) + 1


def round_score(v) -> float | None:
    """A score for JSON: rounded to 6 digits, None when missing or not finite (NaN, inf)."""
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def full_confusion_matrix(pred, target, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Confusion matrix over every pixel, truth 0 included (for plots).

    pred, target: integer arrays/tensors of the same shape with labels in
    0..num_classes-1. Returns int64 (C, C), rows = truth, columns = prediction.
    """
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
        # count on the tensors' device (GPU eval): only C*C numbers cross to the host
        p = pred.reshape(-1).long()
        t = target.reshape(-1).to(p.device).long()
        xp = torch
    else:
        p = _as_numpy(pred).reshape(-1).astype(np.int64, copy=False)
        t = _as_numpy(target).reshape(-1).astype(np.int64, copy=False)
        xp = np
    if p.shape != t.shape:
        raise InputError(f"prediction has {p.numel() if xp is torch else p.size} pixels "
                         f"but truth has {t.numel() if xp is torch else t.size}")
    if p.shape[0]:
        lo, hi = int(xp.minimum(p.min(), t.min())), int(xp.maximum(p.max(), t.max()))
        if lo < 0 or hi >= num_classes:
            raise InputError(f"labels must be in 0..{num_classes - 1}, found {lo}..{hi}")
    cm = xp.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    cm = _as_numpy(cm).reshape(num_classes, num_classes).astype(np.int64)
    return cm


def confusion_matrix(pred, target, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Course confusion matrix: pixels whose truth is 0 are dropped.

    Same shapes as `full_confusion_matrix`; row 0 is therefore always zero.
    """
    cm = full_confusion_matrix(pred, target, num_classes)
    cm[0, :] = 0
    return cm


def class_iou(cm: np.ndarray) -> np.ndarray:
    """IoU per class from a (C, C) matrix; NaN where the union is 0."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def course_miou(cm: np.ndarray) -> float:
    """Mean IoU over classes with non-zero union of a truth-0-dropped matrix.

    `cm` should come from `confusion_matrix` (row 0 empty). A full matrix is
    reduced here too, so passing either gives the course score. NaN if empty.
    """
    cm = np.array(cm, dtype=np.int64, copy=True)
    cm[0, :] = 0
    iou = class_iou(cm)
    valid = ~np.isnan(iou)
    return float(iou[valid].mean()) if valid.any() else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of counted pixels predicted correctly (NaN if none counted)."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else float("nan")


class ConfusionMeter:
    """Accumulates the course confusion matrix over batches.

    `full=True` keeps truth-0 pixels (science plots); `miou()` always applies
    the course rule, so it is the same either way.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, full: bool = False):
        self.num_classes = num_classes
        self.full = full
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        fn = full_confusion_matrix if self.full else confusion_matrix
        self.cm += fn(pred, target, self.num_classes)

    def reset(self) -> None:
        self.cm[:] = 0

    def iou(self) -> np.ndarray:
        cm = self.cm.copy()
        cm[0, :] = 0
        return class_iou(cm)

    def miou(self) -> float:
        return course_miou(self.cm)

    def accuracy(self) -> float:
        cm = self.cm.copy()
        cm[0, :] = 0
        return pixel_accuracy(cm)


# --- calibration: NLL and expected calibration error over labeled pixels ----------------------

#: equal-width confidence bins of the expected calibration error (Guo et al. 2017)
ECE_BINS = 15
#: the smallest probability whose log is taken: the smallest positive float16, the
#: resolution of the probabilities in oof.h5 and probs.h5 (a stored 0 means "below it")
PROB_FLOOR = 2.0 ** -24


class CalibrationMeter:
    """Negative log-likelihood and expected calibration error over labeled pixels, by batch.

    Only pixels whose truth is 1..4 count (the course drops truth 0). p' are the
    probabilities renormalised over classes 1..4, p'(c) = p(c) / sum_{1..4} p, each p
    floored at `PROB_FLOOR` first. Why classes 1..4: a labeled pixel's truth is never 0,
    submissions take the argmax over 1..4, and recipes that ignore background leave
    class 0's output untrained.

    - NLL = mean over labeled pixels of -ln p'(truth) (nats);
    - the top label is argmax_{c in 1..4} p'(c) (`labeled_argmax`), its confidence
      max_c p'(c) (so in [1/4, 1]), correct when the top label is the truth;
    - ECE = sum_b (n_b / N) |acc_b - conf_b| over 15 equal-width bins of confidence on
      [0, 1], bin b holding (b/15, (b+1)/15] (0 goes to bin 0); acc_b and conf_b are
      the bin's share correct and mean confidence, n_b its pixels, N all labeled pixels.
      0 for a perfectly calibrated predictor (in the limit of many pixels).
    """

    def __init__(self, bins: int = ECE_BINS):
        self.bins = bins
        self.count = np.zeros(bins, np.float64)
        self.conf = np.zeros(bins, np.float64)
        self.correct = np.zeros(bins, np.float64)
        self.nll_sum = 0.0

    def update(self, probs, truth) -> None:
        """probs (B, 5, H, W) probabilities (torch or numpy, any positive scale; each floored
        at `PROB_FLOOR`); truth (B, H, W) integer labels 0..4."""
        p = torch.as_tensor(probs)[:, 1:].float().clamp_min(PROB_FLOOR)  # (B, 4, H, W)
        t = torch.as_tensor(truth).to(p.device).long()
        w = (t > 0).double().reshape(-1)
        total = p.sum(1)
        conf, top = p.max(1)
        conf = (conf / total).double().reshape(-1)
        right = (top + 1 == t).double().reshape(-1)
        p_truth = p.gather(1, (t - 1).clamp_min(0)[:, None])[:, 0] / total
        self.nll_sum -= float((p_truth.double().log().reshape(-1) * w).sum())
        b = (conf * self.bins).ceil().long().sub_(1).clamp_(0, self.bins - 1)
        for acc, v in ((self.count, w), (self.conf, conf * w), (self.correct, right * w)):
            acc += torch.bincount(b, v, minlength=self.bins).cpu().numpy()

    @property
    def pixels(self) -> int:
        return int(self.count.sum())

    def nll(self) -> float:
        return self.nll_sum / self.pixels if self.pixels else float("nan")

    def ece(self) -> float:
        n = self.pixels
        return float(np.abs(self.correct - self.conf).sum() / n) if n else float("nan")

    def reliability(self) -> dict:
        """Per bin: pixels, mean confidence and accuracy (None where empty); the bin edges."""
        with np.errstate(divide="ignore", invalid="ignore"):
            conf = np.where(self.count > 0, self.conf / self.count, np.nan)
            acc = np.where(self.count > 0, self.correct / self.count, np.nan)
        return {"edges": [round(b / self.bins, 6) for b in range(self.bins + 1)],
                "pixels": self.count.astype(np.int64).tolist(),
                "confidence": [round_score(v) for v in conf],
                "accuracy": [round_score(v) for v in acc]}

    def to_json(self) -> dict:
        return {"nll": round_score(self.nll()), "ece": round_score(self.ece()),
                "pixels": self.pixels, "bins": self.reliability()}
