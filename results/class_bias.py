"""Probe: how much would per-class logit offsets on the ensemble's out-of-fold probabilities
gain? (results/real-mars.md, round 2: the big-rock decision threshold.)

Reads a finished run folder's oof.h5 files (no TTA), averages the given members with the
given weights, and searches offsets b (classes 2-4; soil fixed at 0) that maximise the course
mIoU over the labeled training pixels: in sample, then cross-fitted (fold k's offsets fitted
on the other folds). Usage:
    .venv/bin/python results/class_bias.py RUN MEMBER,... WEIGHT,... [NPZ]
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np


def load(run: Path, members: list[str], weights: list[float], masks: np.ndarray):
    logp, truth, fold = [], [], []
    k = 0
    while (run / members[0] / f"fold_{k}" / "oof.h5").exists():
        acc = None
        for m, w in zip(members, weights, strict=True):
            with h5py.File(run / m / f"fold_{k}" / "oof.h5", "r") as f:
                ids, p = f["ids"][()], f["probs"][()].astype(np.float32)
            acc = w * p if acc is None else acc + w * p
        y = masks[ids]
        sel = y > 0
        logp.append(np.log(np.clip(acc[:, 1:], 1e-8, None)).transpose(0, 2, 3, 1)[sel])
        truth.append(y[sel].astype(np.int64) - 1)
        fold.append(np.full(int(sel.sum()), k, np.int8))
        k += 1
    return np.concatenate(logp), np.concatenate(truth), np.concatenate(fold)


def iou(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    cm = np.bincount(y * 4 + pred, minlength=16).reshape(4, 4)
    tp = np.diag(cm)
    return tp / np.maximum(cm.sum(0) + cm.sum(1) - tp, 1)


def fit(logp, y, grid=np.linspace(-1.5, 1.5, 31), passes=3):
    b = np.zeros(4, np.float32)
    best = iou(np.argmax(logp, 1), y).mean()
    for _ in range(passes):
        for c in (1, 2, 3):
            for v in grid:
                bb = b.copy()
                bb[c] = v
                s = iou(np.argmax(logp + bb, 1), y).mean()
                if s > best + 1e-6:
                    best, b = s, bb
    return b


def main(argv: list[str]) -> None:
    run, members = Path(argv[0]), argv[1].split(",")
    weights = [float(w) for w in argv[2].split(",")]
    npz = argv[3] if len(argv) > 3 else "../shared/data/real-mars/real_mars.npz"
    masks = np.load(npz)["training_set"][:, 1]
    logp, y, fold = load(run, members, weights, masks)
    fmt = lambda v: " / ".join(f"{100 * x:.2f}" for x in v)  # noqa: E731
    plain = iou(np.argmax(logp, 1), y)
    print(f"{len(y)} labeled pixels; plain: mIoU {100 * plain.mean():.2f} ({fmt(plain)})")
    b = fit(logp, y)
    ins = iou(np.argmax(logp + b, 1), y)
    print(f"in sample: offsets {b.tolist()} mIoU {100 * ins.mean():.2f} ({fmt(ins)})")
    pred = np.empty(len(y), np.int64)
    for k in np.unique(fold):
        bk = fit(logp[fold != k], y[fold != k])
        pred[fold == k] = np.argmax(logp[fold == k] + bk, 1)
        print(f"fold {k}: offsets {bk.tolist()}")
    cf = iou(pred, y)
    print(f"cross-fitted: mIoU {100 * cf.mean():.2f} ({fmt(cf)})")


if __name__ == "__main__":
    main(sys.argv[1:])
