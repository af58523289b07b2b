"""A fold's validation: the course confusion matrix of a model over a (possibly sharded) loader,
and the out-of-fold softmax of saved best weights (through the Predictor's one forward path).
`train` calls both every epoch / at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import IMAGE_SHAPE, NUM_CLASSES
from .device import Resolved
from .ensemble import load_ensemble
from .inference import PredictConfig, Predictor
from .metrics import labeled_argmax
from .models.registry import to_model_input


def predict_oof(fold_dir: Path, rt: Resolved, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Softmax (n,5,H,W) f16 of the fold's saved best weights on ``images``, through the
    Predictor's one forward path (no TTA, on the fold's device and precision ``rt``)."""
    best = load_ensemble(fold_dir, verify=False)  # this fold's own unfinished weights
    pred = Predictor(best, PredictConfig(tta=False, batch_size=batch_size), rt)
    out = np.empty((len(images), NUM_CLASSES, *IMAGE_SHAPE), np.float16)
    for s in range(0, len(images), batch_size):
        ((_, (p,)),) = pred.member_views(images[s:s + batch_size])
        out[s:s + len(p)] = p.half().cpu().numpy()
    return out


def validate(model, loader, accelerator, probs_out: np.ndarray | None = None) -> np.ndarray:
    """Course confusion matrix (truth 0 dropped) of `labeled_argmax` over `loader`.

    The matrix is accumulated on the device with bincount; predictions and masks
    go through `gather_for_metrics`, so several processes count each pixel once.
    With `probs_out` (n,5,H,W) f16 the softmax of every image is stored there too
    (kept for the out-of-fold file when this epoch turns out best).
    """
    model.eval()
    cm = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=accelerator.device)
    n = 0
    with torch.no_grad():
        for images, masks in loader:
            logits = model(to_model_input(images))
            pred, truth = accelerator.gather_for_metrics((labeled_argmax(logits), masks.long()))
            cm += torch.bincount((truth * NUM_CLASSES + pred).reshape(-1),
                                 minlength=NUM_CLASSES * NUM_CLASSES)
            if probs_out is not None:
                p = accelerator.gather_for_metrics(torch.softmax(logits.float(), dim=1).half())
                probs_out[n:n + len(p)] = p.cpu().numpy()
            n += len(pred)
    cm = cm.reshape(NUM_CLASSES, NUM_CLASSES).cpu().numpy()
    cm[0, :] = 0
    return cm
