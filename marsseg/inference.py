"""Inference: the Predictor runs a loaded ensemble on batches of uint8 images, with flip TTA.

Configure once, load once, funnel once (nnU-Net's predictor is the model): a
`Predictor` is built from a loaded `Ensemble`, a `PredictConfig` and the command's
`Resolved` device, precision, backend and threads; every caller then funnels into
ONE method, `Predictor.member_views`, which gives each fold model's softmax of each
TTA view: the views are stacked into one forward pass per model
(``cat([x, flip(x)])`` -> logits -> softmax -> each view flipped back).
``__call__`` averages the views (`mean_views`) and the models with their weights
for `predict` and `report`; `evaluate` scores the views and models one by one; the
training loop's out-of-fold pass runs one fold through it.

No Ray here. Building a Predictor sets torch's thread count (``Resolved.threads``)
and, for a converting backend, writes the conversion into each fold folder's
cache (``backends.prepare``).
The ensemble file's calibration enters here too: a member temperature on each model's
views, and the ensemble temperature on the weighted average (`temperature.apply_temperature`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import backends as B
from .device import Resolved, check_precision_name, resolve
from .ensemble import Ensemble
from .errors import InputError
from .metrics import labeled_argmax
from .models.registry import to_model_input
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
        check_precision_name(self.precision)
        if self.classes not in ("foreground", "all"):
            raise InputError(f"classes must be foreground or all, got {self.classes!r}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InputError(f"--batch-size {self.batch_size}: must be 1..{MAX_BATCH_SIZE} "
                             "(each forward pass holds batch x views images' activations)")

    @property
    def views(self) -> tuple[tuple[int, ...], ...]:
        return tta_views(self.tta, self.tta_vflip)

    def resolve(self) -> Resolved:
        """The one resolution of device, precision, backend (its packages checked) and
        threads for a command: call it at the entry point and pass the result down."""
        rt = resolve(self.device, self.precision, self.threads)
        return rt.with_backend(B.resolve(self.backend, rt.device, self.compile, rt.precision))


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


def mean_views(ps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of one model's view softmaxes (`forward_views`), summed in view order.

    Shape: each float32 (B, C, H, W) -> float32 (B, C, H, W) (the first one itself if alone).
    """
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


def needs_conversion(ensemble: Ensemble, cfg: PredictConfig, rt: Resolved,
                     n_images: int | None = None) -> bool:
    """True when building a Predictor for ``cfg`` (and ``n_images``) would convert a fold
    (and cache it in the run folder, with a progress line): the callers check their data
    before that."""
    n = B.static_batch(cfg.batch_size, n_images) * len(cfg.views)
    return not B.converted(ensemble.models, rt.backend, precision=rt.precision, n=n)


class Predictor:
    """Runs a loaded ensemble on batches of uint8 images (module docstring)."""

    def __init__(self, ensemble: Ensemble, cfg: PredictConfig = PredictConfig(),
                 rt: Resolved | None = None, *, log: Callable[[str], None] | None = None,
                 calib_data=None, n_images: int | None = None):
        """``rt``: the command's resolution (default: ``cfg.resolve()``, for a caller that
        is itself the entry point). ``log`` gets one line per backend conversion;
        ``calib_data`` (shards, npz or an opened source) gives the int8 backend its
        calibration images; ``n_images``, the number of images to be predicted when known,
        caps a converted network's static batch."""
        self.cfg = cfg
        self.rt = rt = rt if rt is not None else cfg.resolve()
        if rt.threads:
            torch.set_num_threads(rt.threads)
        self.ensemble = ensemble
        self.weights = [m.weight for m in ensemble.models]
        self.temperatures = [m.temperature for m in ensemble.models]
        self.temperature = ensemble.temperature  # on the weighted average
        self.names = ensemble.names
        self.views = cfg.views
        self.models = B.prepare(ensemble.models, rt.backend, device=rt.device,
                                precision=rt.precision, batch_size=cfg.batch_size,
                                views=self.views, channels_last=cfg.channels_last, log=log,
                                calib_data=calib_data, n_images=n_images)

    device = property(lambda self: self.rt.device)
    precision = property(lambda self: self.rt.precision)
    backend = property(lambda self: self.rt.backend)

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """Shape: images uint8 (b, H, W) -> float (b, 1, H, W) 0..255 on the device."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return to_model_input(x, self.cfg.channels_last)

    @torch.inference_mode()
    def member_views(self, images: np.ndarray, rows: Sequence[np.ndarray | None] | None = None,
                     calibrated: bool = True) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """The one forward path: (model index, softmax of each TTA view) per fold model.

        ``rows`` (one per model): positions into ``images`` that model sees (None: all;
        a model with no row is skipped). ``calibrated``: each model's member temperature
        applied (the ensemble temperature is ``__call__``'s). Shape: images uint8 (b, H, W)
        -> each view float32 (n, C, H, W) on the device, n = that model's rows, flipped back.
        """
        x = self.to_input(images)
        for k, model in enumerate(self.models):
            r = None if rows is None else rows[k]
            if r is not None and not len(r):
                continue
            xs = x if r is None else x[torch.from_numpy(np.asarray(r)).to(x.device)]
            t = self.temperatures[k] if calibrated else 1.0
            with self.rt.autocast():
                ps = forward_views(model, xs, self.views, t)
            yield k, ps

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray, images: np.ndarray, *, want_probs: bool = False,
                 want_disagreement: bool = False) -> BatchResult:
        """Predict one batch: the weighted mean over models of each model's view mean.

        Shape: ids (b,), images uint8 (b, H, W).
        """
        need_each = want_disagreement and len(self.models) > 1
        each = []
        probs = None
        for k, ps in self.member_views(images):
            p, w = mean_views(ps), self.weights[k]
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
