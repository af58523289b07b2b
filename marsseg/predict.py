"""Ensemble prediction: load a run folder, batched flip TTA, streaming over shards.

An ensemble is every fold model of the selected members of a run folder (its
ensemble file, read by `runfolder.RunFolder`); each fold is rebuilt from its own
folder alone (config + weights via ``load_pretrained``). A member's
weight is shared equally by its folds, so a 5-fold member and a 3-fold member
with the same weight count the same.

Per batch, the TTA views are stacked into ONE forward pass per model:
``cat([x, flip(x)])`` -> logits -> softmax -> each view flipped back -> mean.
Member softmaxes are then averaged with their weights. Images stream from the
data source in fixed-size batches (independent of shard sizes), so the output
is identical for any shard layout and any number of Ray workers, and memory
stays bounded by the batch size.

Ray stays at the edge: ``Predictor`` runs without it; ``predict(workers=N)``
only spreads batches over N Ray actors that each hold a ``Predictor``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import IMAGE_SHAPE, NUM_CLASSES
from . import backends as B
from ._io import atomic_path, sha256_file
from .errors import InputError
from .runfolder import CONFIG, WEIGHTS, RunFolder, fold_name

#: flip dims of each TTA view: identity, horizontal; with vflip also vertical and both
#: (the mirror group nnU-Net uses). Rover images have the sky on top, so vflip is opt-in.
VIEWS_NONE: tuple[tuple[int, ...], ...] = ((),)
VIEWS_HFLIP: tuple[tuple[int, ...], ...] = ((), (-1,))
VIEWS_HVFLIP: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def tta_views(tta: bool = True, vflip: bool = False) -> tuple[tuple[int, ...], ...]:
    """Flip dims of each TTA view (first is always the identity)."""
    if not tta:
        return VIEWS_NONE
    return VIEWS_HVFLIP if vflip else VIEWS_HFLIP


# --------------------------------------------------------------------------- ensemble


@dataclass
class FoldModel:
    """One fold network of one member and its share of the ensemble (shares sum to 1)."""

    member: str
    fold: int
    weight: float
    model: nn.Module
    path: Path

    @property
    def name(self) -> str:
        return fold_name(self.member, self.fold)


@dataclass
class Ensemble:
    """The fold models of a run folder, each with its normalised weight."""

    run_dir: Path
    models: list[FoldModel] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[nn.Module, float]]:
        return ((m.model, m.weight) for m in self.models)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]



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
                  verify: bool = True) -> Ensemble:
    """Load the fold models of a run folder.

    ``members`` defaults to the ensemble file's "selected" (else all members);
    ``folds`` filters fold numbers. A single fold folder (config + weights, no
    ensemble file) loads as a one-model ensemble.
    ``verify`` checks each weight file against the sha256 in the ensemble file.
    """
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    if run.is_fold_folder():
        model = _load_fold(run_dir, None, map_location)
        cfg = json.loads((run_dir / CONFIG).read_text())
        return Ensemble(run_dir, [FoldModel(str(cfg.get("member", run_dir.name)),
                                            int(cfg.get("fold", 0)), 1.0, model, run_dir)])
    spec = run.read_ensemble()
    by_name = {m.get("name"): m for m in spec["members"]}
    if members:
        unknown = [m for m in members if m not in by_name]
        if unknown:
            raise InputError(f"unknown member(s) {', '.join(unknown)}; "
                             f"{run_dir} has {', '.join(map(str, by_name))}")
        chosen = list(members)
    else:
        chosen = spec.get("selected") or list(by_name)
        missing = [m for m in chosen if m not in by_name]
        if missing:
            raise InputError(f"{run.ensemble}: selected member(s) "
                             f"{', '.join(missing)} not in members")
    plan: list[tuple[str, float, dict]] = []
    for name in chosen:
        m = by_name[name]
        fl = [f for f in m.get("folds", []) if folds is None or int(f["fold"]) in set(folds)]
        w = float(m.get("weight", 1.0))  # finite and >= 0: checked by read_ensemble
        if w == 0:  # deselected by `select`: no point running it
            continue
        plan += [(name, w / len(fl), f) for f in fl]
    if folds is not None:
        have = {int(f["fold"]) for _, _, f in plan}
        absent = sorted(set(folds) - have)
        if absent:
            raise InputError(f"fold(s) {absent} not found for member(s) {', '.join(chosen)}")
    total = sum(w for _, w, _ in plan)
    if not plan or total <= 0:
        raise InputError(f"{run_dir}: no fold models selected")
    out = Ensemble(run_dir)
    for name, w, f in plan:
        folder = run.fold_path(name, f)
        model = _load_fold(folder, f.get("sha256") if verify else None, map_location)
        out.models.append(FoldModel(name, int(f["fold"]), w / total, model, folder))
    return out


# --------------------------------------------------------------------------- the forward pass


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
            raise InputError(f"precision must be auto, bf16, fp16 or no, got {self.precision!r}")
        if self.classes not in ("foreground", "all"):
            raise InputError(f"classes must be foreground or all, got {self.classes!r}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        check_device(self.device)

    @property
    def views(self) -> tuple[tuple[int, ...], ...]:
        return tta_views(self.tta, self.tta_vflip)


def check_device(device: str | None) -> torch.device | None:
    """Parse ``--device`` and check that this torch can use it (InputError naming the value)."""
    if not device:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: not a torch device "
                         "(e.g. cpu, cuda, cuda:1, mps)") from None
    if d.type == "cpu":
        return d
    backend = getattr(torch, d.type, None)  # torch.cuda, torch.mps, torch.xpu ...
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        raise InputError(f"--device {device}: this torch ({torch.__version__}) has no usable "
                         f"{d.type} device; use --device cpu or leave --device out")
    count = getattr(backend, "device_count", None)
    if d.index is not None and callable(count) and d.index >= count():
        raise InputError(f"--device {device}: only {count()} {d.type} device(s) visible")
    return d


def resolve_device(device: str | None = None) -> torch.device:
    """The device to run on: the given one, else CUDA when available, else CPU."""
    if device:
        return check_device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16_fast() -> bool:
    """True when the CPU has native bf16 matmul support (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete precision for ``device``; reject fp16 on CPU."""
    if precision == "fp16" and device.type != "cuda":
        raise InputError("precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_bf16_fast() else "no"


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_views(model: nn.Module, x: torch.Tensor,
                  views: Sequence[tuple[int, ...]] = VIEWS_HFLIP) -> list[torch.Tensor]:
    """Softmax of each TTA view, flipped back, from ONE forward pass over the stacked views.

    Shape: x float (B, 1, H, W) in 0..255 -> list of float32 (B, C, H, W), one per view.
    """
    b = x.shape[0]
    xx = torch.cat([x.flip(d) if d else x for d in views]) if len(views) > 1 else x
    logits = model(xx)
    if isinstance(logits, (list, tuple)):
        logits = logits[0]
    p = torch.softmax(logits.float(), dim=1)
    return [p[k * b:(k + 1) * b].flip(d) if d else p[k * b:(k + 1) * b]
            for k, d in enumerate(views)]


def forward_tta(model: nn.Module, x: torch.Tensor,
                views: Sequence[tuple[int, ...]] = VIEWS_HFLIP) -> torch.Tensor:
    """Softmax of ``model`` averaged over TTA views, all views in one forward pass.

    Shape: x float (B, 1, H, W) in 0..255 -> probs float32 (B, C, H, W).
    """
    ps = forward_views(model, x, views)
    if len(ps) == 1:
        return ps[0]
    out = ps[0].clone()
    for p in ps[1:]:
        out += p
    return out.div_(len(ps))


def to_labels(probs: torch.Tensor, classes: str = "foreground") -> torch.Tensor:
    """Labels uint8 (B, H, W) from probs (B, C, H, W); foreground = argmax over classes 1..C-1."""
    if classes == "foreground":
        return (probs[:, 1:].argmax(1) + 1).to(torch.uint8)
    return probs.argmax(1).to(torch.uint8)


@dataclass
class BatchResult:
    """What one batch of images gives (numpy, on the CPU)."""

    ids: np.ndarray                       # int64 (b,)
    labels: np.ndarray                    # uint8 (b, H, W)
    probs: np.ndarray | None = None       # float16 (b, C, H, W)
    disagreement: np.ndarray | None = None  # float16 (b, H, W): weighted share of models whose
    #                                        label differs from the ensemble's


class Predictor:
    """Runs an ensemble on batches of uint8 images. No Ray, no files: pure compute."""

    def __init__(self, ensemble: Ensemble, cfg: PredictConfig = PredictConfig(), *,
                 log: Callable[[str], None] | None = None, calib_data=None):
        """``log`` gets one line per backend conversion; ``calib_data`` (shards or npz)
        gives the int8 backend its calibration images."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.weights = [m.weight for m in ensemble.models]
        self.names = ensemble.names
        self.views = cfg.views
        self.backend = B.resolve(cfg.backend, self.device, cfg.compile)
        self.models = B.prepare(ensemble.models, self.backend, device=self.device,
                                precision=self.precision, batch_size=cfg.batch_size,
                                views=self.views, channels_last=cfg.channels_last, log=log,
                                calib_data=calib_data)

    def _input(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.unsqueeze(1).float()
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def model_probs(self, images: np.ndarray) -> list[torch.Tensor]:
        """Per-model TTA-averaged softmax, each float32 (B, C, H, W) on the device."""
        x = self._input(images)
        with _autocast(self.device, self.precision):
            return [forward_tta(m, x, self.views) for m in self.models]

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray, images: np.ndarray, *, want_probs: bool = False,
                 want_disagreement: bool = False) -> BatchResult:
        """Predict one batch. Shape: ids (b,), images uint8 (b, H, W)."""
        x = self._input(images)
        need_each = want_disagreement and len(self.models) > 1
        each = []
        probs = None
        with _autocast(self.device, self.precision):
            for m, w in zip(self.models, self.weights, strict=True):
                p = forward_tta(m, x, self.views)
                if need_each:
                    each.append(to_labels(p, self.cfg.classes))
                probs = p * w if probs is None else probs.add_(p, alpha=w)
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


# --------------------------------------------------------------------------- data streaming


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim != 3 or tuple(images.shape[1:]) != tuple(IMAGE_SHAPE):
        raise InputError(f"{where}: images have shape {tuple(images.shape[1:])}, "
                         f"expected {tuple(IMAGE_SHAPE)}")
    if images.dtype != np.uint8:
        raise InputError(f"{where}: images must be uint8, got {images.dtype}")
    return images


def count_images(data: str | os.PathLike, split: str = "test") -> int:
    """Number of images of ``split`` in a shard folder or an npz (checks the image shape)."""
    from . import data as D

    data = Path(data)
    if not data.exists():
        raise InputError(f"{data}: data path does not exist")
    if data.is_dir():
        shape = D.read_dataset(data).get("image_shape")
        if shape is not None and tuple(shape) != tuple(IMAGE_SHAPE):
            raise InputError(f"{data / 'dataset.json'}: image_shape {tuple(shape)}, "
                             f"expected {tuple(IMAGE_SHAPE)}")
        check_shards(data, split)
    return int(D.split_info(data, split)["count"])


def check_shards(shard_dir: Path, split: str) -> None:
    """Check every shard of ``split`` against its sha256 in dataset.json and its image shape
    (HDF5 metadata), so an edited, truncated or foreign shard fails before any prediction work."""
    import h5py

    from . import data as D
    from .runfolder import verify_shards

    for path in D.shard_paths(shard_dir, split):
        try:
            with h5py.File(path, "r") as f:
                shape = f["images"].shape
                n_ids = f["ids"].shape[0]
        except KeyError as e:
            raise InputError(f"{path}: missing dataset {e}") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read HDF5 shard (truncated or corrupt: "
                             f"{str(e).splitlines()[0]})") from None
        if len(shape) != 3 or tuple(shape[1:]) != tuple(IMAGE_SHAPE):
            raise InputError(f"{path}: images have shape {tuple(shape[1:])}, "
                             f"expected {tuple(IMAGE_SHAPE)}")
        if n_ids != shape[0]:
            raise InputError(f"{path}: {n_ids} ids for {shape[0]} images")
    verify_shards(shard_dir, split)


def rebatch(stream: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
            where: str = "data") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup (ids, images) pieces into batches of exactly ``batch_size`` (the last may be
    smaller), so results do not depend on shard sizes. Also checks shape and id order."""
    buf_ids: list[np.ndarray] = []
    buf_img: list[np.ndarray] = []
    have = 0
    last = None
    for ids, images in stream:
        ids = np.asarray(ids, dtype=np.int64)
        images = _check_images(np.asarray(images), where)
        if len(ids) == 0:
            continue
        if np.any(np.diff(ids) <= 0) or (last is not None and ids[0] <= last):
            raise InputError(f"{where}: image ids are not in increasing order")
        last = int(ids[-1])
        buf_ids.append(ids)
        buf_img.append(images)
        have += len(ids)
        while have >= batch_size:
            all_ids = np.concatenate(buf_ids)
            all_img = np.concatenate(buf_img)
            yield all_ids[:batch_size], all_img[:batch_size]
            buf_ids, buf_img = [all_ids[batch_size:]], [all_img[batch_size:]]
            have -= batch_size
    if have:
        yield np.concatenate(buf_ids), np.concatenate(buf_img)


def guard_reads(stream, where, what: str) -> Iterator:
    """Pass ``stream`` through; a read error of a shard (truncated HDF5, missing key ...)
    becomes one InputError line naming ``where`` and ``what`` was being read."""
    it = iter(stream)
    while True:
        try:
            piece = next(it)
        except StopIteration:
            return
        except InputError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{where}: cannot read {what} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        yield piece


def stream_batches(data: str | os.PathLike, split: str, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, images) batches of ``batch_size`` from a shard folder or npz; read errors of a
    shard (truncated HDF5 ...) become InputError."""
    from . import data as D

    return guard_reads(D.as_batches(Path(data), split, batch_size), data, f"{split} images")


# --------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True):
    """A rich progress bar with images/s; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "- img/s", style="progress.data.speed")

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  Rate(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        try:
            yield lambda n: bar.advance(task, n)
        except BaseException:
            # On failure the error line stands alone: clear the bar, skip rich's blank line.
            bar.live.transient = True
            bar.live.stop()
            bar.disable = True
            raise


# --------------------------------------------------------------------------- Ray at the edge


def _ray_results(run_dir, members, folds, cfg, batches, workers, address, want_probs,
                 want_dis) -> Iterator[BatchResult]:
    """Spread batches over ``workers`` Ray actors; yield results in input order."""
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # "local" starts a private instance instead of joining a `ray start` cluster.
        kw = {"address": address} if address else {"address": "local", "num_cpus": max(workers, 1)}
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kw)
        started = True
    try:
        gpu = cfg.device != "cpu" and torch.cuda.is_available()

        @ray.remote(num_cpus=1, num_gpus=(1.0 / workers) if gpu else 0)
        class _Worker:
            def __init__(self):
                threads = cfg.threads or 1
                self.p = Predictor(load_ensemble(run_dir, members, folds, verify=False),
                                   PredictConfig(**{**cfg.__dict__, "threads": threads}))

            def run(self, ids, images):
                return self.p(ids, images, want_probs=want_probs, want_disagreement=want_dis)

        actors = [_Worker.remote() for _ in range(workers)]
        pending: list = []
        k = 0
        for ids, images in batches:
            pending.append(actors[k % workers].run.remote(ids, images))
            k += 1
            if len(pending) >= 2 * workers:  # bounded in-flight work: bounded memory
                yield ray.get(pending.pop(0))
        while pending:
            yield ray.get(pending.pop(0))
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- outputs


class _ProbsWriter:
    """Streams averaged probabilities (f16) and the disagreement map into an HDF5 file,
    atomically (temp name, renamed on success)."""

    def __init__(self, path: Path, total: int, attrs: dict):
        import h5py

        self.path = path
        self._atomic = atomic_path(path)
        self.tmp = self._atomic.__enter__()
        self.f = h5py.File(self.tmp, "w")
        h, w = IMAGE_SHAPE
        self.ids = self.f.create_dataset("ids", (total,), dtype="i8")
        self.probs = self.f.create_dataset("probs", (total, NUM_CLASSES, h, w), dtype="f2",
                                           chunks=(1, NUM_CLASSES, h, w))
        self.dis = self.f.create_dataset("disagreement", (total, h, w), dtype="f2",
                                         chunks=(1, h, w))
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.n = 0

    def write(self, r: BatchResult) -> None:
        s = slice(self.n, self.n + len(r.ids))
        self.ids[s] = r.ids
        self.probs[s] = r.probs
        self.dis[s] = r.disagreement
        self.n += len(r.ids)

    def close(self, ok: bool) -> None:
        self.f.close()
        if ok:
            self._atomic.__exit__(None, None, None)
        else:  # atomic_path removes the temporary file
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def iter_predictions(run_dir: str | os.PathLike, data: str | os.PathLike, *,
                     cfg: PredictConfig = PredictConfig(), members: Sequence[str] | None = None,
                     folds: Sequence[int] | None = None, split: str = "test", workers: int = 0,
                     address: str | None = None, want_probs: bool = False,
                     want_disagreement: bool = False, ensemble: Ensemble | None = None,
                     log: Callable[[str], None] | None = None) -> Iterator[BatchResult]:
    """Stream BatchResults in id order over ``split`` of ``data`` (shard folder or npz).

    ``ensemble``: an already loaded ``load_ensemble(run_dir, members, folds)`` to reuse.
    ``log``: gets one line per backend conversion (seconds included).
    """
    if ensemble is None:  # also validates the folder before Ray starts
        ensemble = load_ensemble(run_dir, members, folds)
    batches = rebatch(stream_batches(data, split, cfg.batch_size), cfg.batch_size, str(data))
    if workers and workers > 1:
        if B.resolve(cfg.backend, resolve_device(cfg.device), cfg.compile) != "eager":
            Predictor(ensemble, cfg, log=log, calib_data=data)  # convert once; workers load it
        yield from _ray_results(run_dir, members, folds, cfg, batches, workers, address,
                                want_probs, want_disagreement)
        return
    pred = Predictor(ensemble, cfg, log=log, calib_data=data)
    for ids, images in batches:
        yield pred(ids, images, want_probs=want_probs, want_disagreement=want_disagreement)


def _config(cfg: PredictConfig | None, overrides: dict) -> PredictConfig:
    cfg = cfg or PredictConfig()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(PredictConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown predict option(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def predict_probs(run_dir: str | os.PathLike, data: str | os.PathLike, *,
                  cfg: PredictConfig | None = None, members: Sequence[str] | None = None,
                  folds: Sequence[int] | None = None, split: str = "test",
                  **options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Averaged probabilities in memory (small sets; use ``predict(probs_path=...)`` for big ones).

    Returns ids int64 (n,), probs float16 (n, C, H, W), disagreement float16 (n, H, W).
    ``options`` override fields of ``cfg`` (tta=..., batch_size=..., precision=...).
    """
    cfg = _config(cfg, options)
    res = list(iter_predictions(run_dir, data, cfg=cfg, members=members, folds=folds,
                                split=split, want_probs=True, want_disagreement=True))
    if not res:
        h, w = IMAGE_SHAPE
        return (np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES, h, w), np.float16),
                np.zeros((0, h, w), np.float16))
    return (np.concatenate([r.ids for r in res]), np.concatenate([r.probs for r in res]),
            np.concatenate([r.disagreement for r in res]))


def predict(run_dir: str | os.PathLike, data: str | os.PathLike, out_csv: str | os.PathLike, *,
            cfg: PredictConfig | None = None, members: Sequence[str] | None = None,
            folds: Sequence[int] | None = None, probs_path: str | os.PathLike | None = None,
            workers: int = 0, address: str | None = None, split: str = "test",
            progress: bool = False,
            on_batch: Callable[[BatchResult], None] | None = None, **options) -> dict:
    """Predict ``split`` of ``data`` with the run folder's ensemble and write the submission CSV.

    ``options`` override fields of ``cfg`` (e.g. ``tta=False, precision="no"``).
    Returns a summary dict (rows, seconds, images/s, models, views, precision, paths).
    Any failure (bad input, Ctrl-C) leaves neither CSV nor probs file behind.
    """
    from .submission import SubmissionWriter, check_out_path

    cfg = _config(cfg, options)
    out_csv = check_out_path(out_csv)
    probs_path = check_out_path(probs_path) if probs_path else None
    total = count_images(data, split)
    ensemble = load_ensemble(run_dir, members, folds)  # fail fast, before any work
    names = ensemble.names
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    backend = B.resolve(cfg.backend, device, cfg.compile)  # a missing package fails here
    want = probs_path is not None
    pw = None
    ok = False
    t0 = time.perf_counter()
    try:
        if want:
            pw = _ProbsWriter(probs_path, total, {
                "models": json.dumps(names), "views": json.dumps(cfg.views),
                "classes": cfg.classes, "precision": precision})
        with SubmissionWriter(out_csv, expected_rows=total) as w, \
                progress_bar(total, "predict", progress) as advance:
            for r in iter_predictions(run_dir, data, cfg=cfg, members=members, folds=folds,
                                      split=split, workers=workers, address=address,
                                      want_probs=want, want_disagreement=want,
                                      ensemble=ensemble, log=B.stderr_line if progress else None):
                w.write(r.ids, r.labels)
                if pw:
                    pw.write(r)
                if on_batch:
                    on_batch(r)
                advance(len(r.ids))
        ok = True
    finally:
        if pw:
            pw.close(ok)
    dt = time.perf_counter() - t0
    return {"rows": total, "seconds": round(dt, 3), "images_per_s": round(total / max(dt, 1e-9), 1),
            "models": names, "views": len(cfg.views), "precision": precision, "backend": backend,
            "device": str(device), "csv": str(out_csv),
            "probs": str(probs_path) if probs_path else None}
