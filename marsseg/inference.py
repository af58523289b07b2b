"""Inference: the Predictor runs a loaded ensemble on batches of uint8 images, with flip TTA.

Per batch, the TTA views are stacked into ONE forward pass per model:
``cat([x, flip(x)])`` -> logits -> softmax -> each view flipped back -> mean.
Member softmaxes are then averaged with their weights. The ensemble file's
calibration enters here too: a member temperature on each model's views, or the
ensemble temperature on the weighted average (`temperature.apply_temperature`).
No Ray and no files here: ``predict`` streams data through it, ``evaluate`` and ``report`` call it
directly, and ``backends`` turns its fold modules into the callables it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import backends as B
from .device import autocast, check_device, resolve_device, resolve_precision
from .ensemble import Ensemble
from .errors import InputError
from .metrics import labeled_argmax
from .temperature import apply_temperature

#: flip dims of each TTA view: identity, horizontal; with vflip also vertical and both
#: (the mirror group nnU-Net uses). Rover images have the sky on top, so vflip is opt-in.
VIEWS_NONE: tuple[tuple[int, ...], ...] = ((),)
VIEWS_HFLIP: tuple[tuple[int, ...], ...] = ((), (-1,))
VIEWS_HVFLIP: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
#: largest --batch-size: beyond it one forward pass (x 4 views) asks for tens of GB
MAX_BATCH_SIZE = 1024


def tta_views(tta: bool = True, vflip: bool = False) -> tuple[tuple[int, ...], ...]:
    """Flip dims of each TTA view (first is always the identity)."""
    if not tta:
        return VIEWS_NONE
    return VIEWS_HVFLIP if vflip else VIEWS_HFLIP


@dataclass(frozen=True)
class PredictConfig:
    """How to run the networks (not what they learned)."""

    tta: bool = True
    tta_vflip: bool = False
    batch_size: int = 64
    precision: str = "auto"          # auto | bf16 | fp16 | no
    classes: str = "foreground"      # foreground (argmax over 1..4) | all
    channels_last: bool = True
    compile: bool = False            # the older switch for backend="compile"
    device: str | None = None        # None: cuda if available, else cpu
    threads: int | None = None
    backend: str = "eager"           # eager | compile | openvino | openvino-int8 | auto (backends.py)

    def __post_init__(self):
        B.check_name(self.backend)
        if self.precision not in ("auto", "bf16", "fp16", "no"):
            raise InputError(f"--precision: unknown value {self.precision!r} "
                             "(valid: auto, bf16, fp16, no)")
        if self.classes not in ("foreground", "all"):
            raise InputError(f"classes must be foreground or all, got {self.classes!r}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InputError(f"--batch-size {self.batch_size}: must be 1..{MAX_BATCH_SIZE} "
                             "(each forward pass holds batch x views images' activations)")
        check_device(self.device)

    @property
    def views(self) -> tuple[tuple[int, ...], ...]:
        return tta_views(self.tta, self.tta_vflip)


def forward_views(model: nn.Module, x: torch.Tensor,
                  views: Sequence[tuple[int, ...]] = VIEWS_HFLIP,
                  temperature: float = 1.0) -> list[torch.Tensor]:
    """Softmax of each TTA view, flipped back, from ONE forward pass over the stacked views.

    ``temperature``: the model's calibration (`temperature.apply_temperature`, logits / T).
    Shape: x float (B, 1, H, W) in 0..255 -> list of float32 (B, C, H, W), one per view.
    """
    b = x.shape[0]
    xx = torch.cat([x.flip(d) if d else x for d in views]) if len(views) > 1 else x
    logits = model(xx)
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    p = apply_temperature(torch.softmax(logits.float(), dim=1), temperature)
    return [p[k * b:(k + 1) * b].flip(d) if d else p[k * b:(k + 1) * b]
            for k, d in enumerate(views)]


def forward_tta(model: nn.Module, x: torch.Tensor,
                views: Sequence[tuple[int, ...]] = VIEWS_HFLIP,
                temperature: float = 1.0) -> torch.Tensor:
    """Softmax of ``model`` averaged over TTA views, all views in one forward pass.

    Shape: x float (B, 1, H, W) in 0..255 -> probs float32 (B, C, H, W).
    """
    ps = forward_views(model, x, views, temperature)
    if len(ps) == 1:
        return ps[0]
    out = ps[0].clone()
    for p in ps[1:]:
        out += p
    return out.div_(len(ps))


def to_labels(probs: torch.Tensor, classes: str = "foreground") -> torch.Tensor:
    """Labels uint8 (B, H, W) from probs (B, C, H, W); foreground: `metrics.labeled_argmax`."""
    if classes == "foreground":
        return labeled_argmax(probs).to(torch.uint8)
    return probs.argmax(1).to(torch.uint8)


@dataclass
class BatchResult:
    """What one batch of images gives (numpy, on the CPU)."""

    ids: np.ndarray                       # int64 (b,)
    labels: np.ndarray                    # uint8 (b, H, W)
    probs: np.ndarray | None = None       # float16 (b, C, H, W)
    disagreement: np.ndarray | None = None  # float16 (b, H, W): weighted share of models whose
    #                                        label differs from the ensemble's


def needs_conversion(ensemble: Ensemble, cfg: PredictConfig, n_images: int | None = None) -> bool:
    """True when building a Predictor for ``cfg`` (and ``n_images``) would convert a fold
    (and cache it in the run folder, with a progress line): the callers check their data
    before that."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    backend = B.resolve(cfg.backend, device, cfg.compile, precision)
    n = B.static_batch(cfg.batch_size, n_images) * len(cfg.views)
    return not B.converted(ensemble.models, backend, precision=precision, n=n)


class Predictor:
    """Runs an ensemble on batches of uint8 images. No Ray, no files: pure compute."""

    def __init__(self, ensemble: Ensemble, cfg: PredictConfig = PredictConfig(), *,
                 log: Callable[[str], None] | None = None, calib_data=None,
                 n_images: int | None = None):
        """``log`` gets one line per backend conversion; ``calib_data`` (shards or npz)
        gives the int8 backend its calibration images; ``n_images``, the number of images
        to be predicted when known, caps a converted network's static batch."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.weights = [m.weight for m in ensemble.models]
        self.temperatures = [m.temperature for m in ensemble.models]
        self.temperature = ensemble.temperature  # on the weighted average
        self.names = ensemble.names
        self.views = cfg.views
        self.backend = B.resolve(cfg.backend, self.device, cfg.compile, self.precision)
        self.models = B.prepare(ensemble.models, self.backend, device=self.device,
                                precision=self.precision, batch_size=cfg.batch_size,
                                views=self.views, channels_last=cfg.channels_last, log=log,
                                calib_data=calib_data, n_images=n_images)

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """Shape: images uint8 (b, H, W) -> float (b, 1, H, W) 0..255 on the device."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.unsqueeze(1).float()
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def model_probs(self, images: np.ndarray) -> list[torch.Tensor]:
        """Per-model TTA-averaged softmax (member temperatures applied), each float32
        (B, C, H, W) on the device."""
        x = self.to_input(images)
        with autocast(self.device, self.precision):
            return [forward_tta(m, x, self.views, t)
                    for m, t in zip(self.models, self.temperatures, strict=True)]

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray, images: np.ndarray, *, want_probs: bool = False,
                 want_disagreement: bool = False) -> BatchResult:
        """Predict one batch. Shape: ids (b,), images uint8 (b, H, W)."""
        x = self.to_input(images)
        need_each = want_disagreement and len(self.models) > 1
        each = []
        probs = None
        with autocast(self.device, self.precision):
            for m, w, t in zip(self.models, self.weights, self.temperatures, strict=True):
                p = forward_tta(m, x, self.views, t)
                if need_each:
                    each.append(to_labels(p, self.cfg.classes))
                probs = p * w if probs is None else probs.add_(p, alpha=w)
        probs = apply_temperature(probs, self.temperature)
        labels = to_labels(probs, self.cfg.classes)
        out = BatchResult(np.asarray(ids, dtype=np.int64), labels.cpu().numpy())
        if want_probs:
            out.probs = probs.to(torch.float16).cpu().numpy()
        if want_disagreement:
            dis = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
            for lab, w in zip(each, self.weights, strict=False):
                dis += (lab != labels).float() * w
            out.disagreement = dis.to(torch.float16).cpu().numpy()
        return out
