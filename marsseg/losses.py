"""Segmentation losses: weighted cross entropy, soft Dice, focal, Lovász-softmax, and sums of them.

The math lives in plain functions (tested on hand-made tensors); `CombinedLoss`
only wraps them. Shapes: logits float (B, C, H, W), target int64 (B, H, W)
with labels 0..C-1. `ignore_background=True` drops pixels whose truth is 0 from
every loss (class 0 is "unlabeled" in the course data and the course metric
ignores it), which the reference found worth +16 mIoU points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import NUM_CLASSES
from .errors import InputError

WEIGHT_METHODS = ("none", "inverse", "inverse_sqrt", "effective")
LOSS_TERMS = ("ce", "dice", "focal", "lovasz")


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or target.ndim != 3 or logits.shape[:1] + logits.shape[2:] != target.shape:
        raise InputError(f"loss expects logits (B,C,H,W) and target (B,H,W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")


def _valid(target: torch.Tensor, ignore_background: bool) -> torch.Tensor | None:
    return (target != 0) if ignore_background else None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_background: bool = False) -> torch.Tensor:
    """Class-weighted pixel cross entropy (weighted mean, as torch defines it).

    With `ignore_background` the pixels whose truth is 0 contribute nothing
    (ignore_index=0). A batch with no counted pixel gives 0 (not NaN).
    """
    _check(logits, target)
    logits = logits.float()
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    if ignore_background and not bool((target != 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=weight,
                           ignore_index=0 if ignore_background else -100)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None, ignore_background: bool = False) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): sum_i w[t_i] (1-p_i)^gamma (-log p_i) / sum_i w[t_i].

    Normalised like weighted cross entropy, so `gamma=0` equals `cross_entropy`.
    """
    _check(logits, target)
    logp = F.log_softmax(logits.float(), dim=1)
    logpt = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    pt = logpt.exp()
    w = (torch.ones_like(logpt) if weight is None
         else weight.to(device=logits.device, dtype=logpt.dtype)[target])
    valid = _valid(target, ignore_background)
    if valid is not None:
        w = w * valid
    term = w * (1.0 - pt).clamp_min(0).pow(gamma) * (-logpt)
    denom = w.sum()
    if float(denom) == 0.0:
        return logits.sum() * 0.0
    return term.sum() / denom


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_background: bool = False,
              smooth: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss: 1 - mean_c (2|P_c∩T_c| + s) / (|P_c| + |T_c| + s).

    Sums run over the whole batch (B, H, W). With `ignore_background` class 0
    leaves the mean and pixels whose truth is 0 leave the sums.
    """
    _check(logits, target)
    num_classes = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    valid = _valid(target, ignore_background)
    if valid is not None:
        v = valid.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * v, onehot * v
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    card = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + smooth) / (card + smooth)
    if ignore_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


def lovasz_grad(errors_gt: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss along sorted errors.

    `errors_gt` (P, C): per class, the ground-truth indicator of the pixels in the
    order of decreasing error. Returns (P, C): Δ_J({π_1..π_i}) - Δ_J({π_1..π_{i-1}}),
    where Δ_J(M) = |M| / |fg ∪ M| is 1 - IoU of the class when the set M is wrong.
    """
    gts = errors_gt.sum(0, keepdim=True)
    intersection = gts - errors_gt.cumsum(0)
    union = gts + (1.0 - errors_gt).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)


def lovasz_softmax_probs(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018) on flat pixels, classes present in `labels`.

    probs (P, C) softmax probabilities, labels (P,) int64. Per class c, the pixel
    errors m_i = |[y_i = c] - p_i,c| sorted decreasingly, dotted with `lovasz_grad`:
    the Lovász extension of 1 - IoU_c, exact (= 1 - IoU_c) on one-hot predictions.
    The mean runs over the classes that occur in `labels` (the paper's "present").
    """
    if labels.numel() == 0:
        return probs.sum() * 0.0
    fg = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    errors = (fg - probs).abs()
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    grad = lovasz_grad(fg.gather(0, perm))
    per_class = (errors_sorted * grad).sum(0)
    present = fg.sum(0) > 0
    return per_class[present].mean()


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor,
                   ignore_background: bool = False) -> torch.Tensor:
    """Lovász-softmax loss over the whole batch (the paper's per_image=False).

    The batch's pixels form one set, so the surrogate follows the IoU of the batch
    as the course metric scores a whole set. With `ignore_background` pixels whose
    truth is 0 leave the set (so class 0 is never present). No counted pixel gives 0.
    """
    _check(logits, target)
    num_classes = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, num_classes)
    labels = target.reshape(-1)
    if ignore_background:
        keep = labels != 0
        if not bool(keep.any()):
            return logits.float().sum() * 0.0
        probs, labels = probs[keep], labels[keep]
    return lovasz_softmax_probs(probs, labels)


def class_weights(pixel_counts: Sequence[int], method: str = "inverse", beta: float = 0.9999,
                  ignore_background: bool = False) -> torch.Tensor:
    """Per-class loss weights from pixel counts, normalised to mean 1 over used classes.

    - "inverse":      w_c ∝ 1 / n_c
    - "inverse_sqrt": w_c ∝ 1 / sqrt(n_c)
    - "effective":    w_c ∝ (1 - beta) / (1 - beta^n_c), Cui et al. 2019,
                      "Class-Balanced Loss Based on Effective Number of Samples"
    - "none":         all ones
    With `ignore_background` class 0 gets weight 0 and is left out of the mean.
    Counts of 0 are treated as 1 so a class missing from the data gets the
    largest weight instead of infinity. Returns float32 (len(pixel_counts),).
    """
    if method not in WEIGHT_METHODS:
        raise InputError(f"class weight method {method!r} is not one of {', '.join(WEIGHT_METHODS)}")
    counts = torch.as_tensor([float(c) for c in pixel_counts], dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 2 or bool((counts < 0).any()):
        raise InputError(f"pixel_counts must be a list of non-negative counts, got {list(pixel_counts)}")
    if method == "effective" and not 0.0 < beta < 1.0:
        raise InputError(f"beta must be in (0, 1) for effective-number weights, got {beta}")
    n = counts.clamp_min(1.0)
    if method == "none":
        w = torch.ones_like(n)
    elif method == "inverse":
        w = 1.0 / n
    elif method == "inverse_sqrt":
        w = 1.0 / n.sqrt()
    else:
        # 1 - beta^n computed as -expm1(n log beta): exact for beta near 1.
        w = (1.0 - beta) / -torch.expm1(n * math.log(beta))
    used = torch.ones_like(w, dtype=torch.bool)
    if ignore_background:
        used[0] = False
    w = torch.where(used, w / w[used].mean(), torch.zeros_like(w))
    return w.float()


class CombinedLoss(nn.Module):
    """Weighted sum of loss terms, e.g. {"ce": 1.0, "dice": 1.0}.

    Called with one logits tensor or a list [main, aux1, aux2, ...] (deep
    supervision, aux already at the target size); the list is combined with
    weights 1, 1/2, 1/4, ... normalised to sum 1.
    """

    def __init__(self, terms: dict[str, float], weight: torch.Tensor | Sequence[float] | None = None,
                 ignore_background: bool = False, focal_gamma: float = 2.0):
        super().__init__()
        if not terms:
            raise InputError(f"loss terms are empty; use some of {', '.join(LOSS_TERMS)}")
        for k, v in terms.items():
            if k not in LOSS_TERMS:
                raise InputError(f"unknown loss term {k!r}; valid: {', '.join(LOSS_TERMS)}")
            if not isinstance(v, (int, float)) or v < 0:
                raise InputError(f"loss term {k!r} needs a non-negative number, got {v!r}")
        self.terms = {k: float(v) for k, v in terms.items()}
        self.ignore_background = bool(ignore_background)
        self.focal_gamma = float(focal_gamma)
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.shape != (NUM_CLASSES,):
                raise InputError(f"class weights need {NUM_CLASSES} values, got {tuple(weight.shape)}")
        self.register_buffer("weight", weight, persistent=False)

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        for name, k in self.terms.items():
            if k == 0:
                continue
            if name == "ce":
                v = cross_entropy(logits, target, self.weight, self.ignore_background)
            elif name == "dice":
                v = dice_loss(logits, target, self.ignore_background)
            elif name == "lovasz":
                v = lovasz_softmax(logits, target, self.ignore_background)
            else:
                v = focal_loss(logits, target, self.focal_gamma, self.weight, self.ignore_background)
            total = total + k * v
        return total

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return self.single(logits, target)
        ws = [0.5 ** i for i in range(len(logits))]
        norm = sum(ws)
        return sum((w / norm) * self.single(lg, target) for w, lg in zip(ws, logits, strict=True))


def make_loss(cfg, train_masks: np.ndarray, device) -> nn.Module:
    """A member's `CombinedLoss` (its `LossConfig` ``cfg``). Class weights: explicit, or by a
    method from the pixel counts of the fold's training masks (uint8 (n, H, W)); times
    `class_scale` when the recipe gives one."""
    weight = None
    if isinstance(cfg.class_weights, tuple):  # explicit, as written in the recipe
        weight = torch.tensor(cfg.class_weights, dtype=torch.float32)
    elif cfg.class_weights != "none":
        counts = np.bincount(train_masks.reshape(-1), minlength=NUM_CLASSES)[:NUM_CLASSES]
        weight = class_weights(counts.tolist(), cfg.class_weights, beta=cfg.beta,
                               ignore_background=cfg.ignore_background)
    if cfg.class_scale:
        # weighted means (ce, focal) divide by the summed weights: no renormalising needed
        base = torch.ones(NUM_CLASSES) if weight is None else weight
        weight = base * torch.tensor(cfg.class_scale, dtype=torch.float32)
    return CombinedLoss(cfg.terms, weight=weight, ignore_background=cfg.ignore_background,
                        focal_gamma=cfg.focal_gamma).to(device)


def soft_kl(logits: torch.Tensor, soft: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) per pixel, weighted by the target's own mass.

    soft float (B, C, H, W): the teacher's probabilities times a per-pixel weight w in [0, 1]
    (so w = soft.sum(1); w = 0: no target there). With q_T ∝ (soft / w)^(1/T) and
    p_T = softmax(logits / T), returns T² Σ w·KL(q_T || p_T) / (pixels with w > 0), and 0
    when no pixel has a target. T² keeps the gradient scale of T = 1 (Hinton et al. 2015).
    """
    if logits.shape != soft.shape:
        raise InputError(f"soft_kl expects logits and soft targets of one shape (B,C,H,W), got "
                         f"{tuple(logits.shape)} and {tuple(soft.shape)}")
    logits, soft = logits.float(), soft.float()
    w = soft.sum(1)
    has = w > 0
    n = has.sum()
    if not bool(n):
        return logits.sum() * 0.0
    q = soft / w.clamp_min(1e-12)[:, None]
    if temperature != 1.0:
        q = q.clamp_min(0.0).pow(1.0 / temperature)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-12)
    logp = F.log_softmax(logits / temperature, dim=1)
    kl = (torch.xlogy(q, q) - q * logp).sum(1)
    return (w * kl).sum() / n * temperature ** 2
