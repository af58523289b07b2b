"""Predict a data split with a run folder's ensemble: the submission CSV, optionally probabilities.

Images stream from the data source in fixed-size batches (`data.stream`), so the
output is identical for any shard layout and any number of Ray workers, and
memory stays bounded by the batch size. Each batch goes through a `Predictor`
(pure compute: the ensemble, batched flip TTA) and out to the CSV writer and,
with ``probs_path``, an HDF5 file of averaged probabilities and disagreement.

Ray stays at the edge: ``predict(workers=N)`` only spreads batches over N Ray
actors that each hold a ``Predictor`` (Ray started or joined by `cluster`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import IMAGE_SHAPE, NUM_CLASSES
from . import backends as B
from ._io import atomic_path, check_space, no_space
from ._progress import progress_bar
from .cluster import check_address
from .confine import check_apart
from .data import count_images, open_checked, prescan, reads_data, stream_batches
from .data.source import Source
from .device import Resolved
from .ensemble import Ensemble, load_ensemble
from .errors import InputError
from .inference import BatchResult, PredictConfig, Predictor, needs_conversion
from .records import typed
from .submission import SubmissionWriter, check_out_path

# --------------------------------------------------------------------------- Ray at the edge


def _ray_results(run_dir, members, folds, cfg: PredictConfig, rt: Resolved, batches: Iterable,
                 workers: int, address: str | None, want_probs: bool, want_dis: bool,
                 n_images: int | None) -> Iterator[BatchResult]:
    """Spread batches over ``workers`` Ray actors; yield results in input order. Each actor
    loads the ensemble (weights checked by the driver) and runs at the driver's ``rt``."""
    import ray

    from .cluster import ray_session

    rt = rt.with_threads(rt.threads or 1)
    with ray_session(address, min_cpus=workers,
                     fallback="give --workers 1 to predict in this process"):
        gpu = rt.device.type == "cuda"

        @ray.remote(num_cpus=1, num_gpus=(1.0 / workers) if gpu else 0)
        class _Worker:
            def __init__(self):
                self.p = Predictor(load_ensemble(run_dir, members, folds, verify=False), cfg, rt,
                                   n_images=n_images)

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


# --------------------------------------------------------------------------- outputs


class _ProbsWriter:
    """Streams averaged probabilities (f16) and the disagreement map into an HDF5 file
    under a temporary name; `finish` closes it and reads it back against a running sha256
    of what was written, `commit` renames it into place. A full disk is one line naming
    the file."""

    def __init__(self, path: Path, total: int, attrs: dict):
        import h5py

        h, w = IMAGE_SHAPE
        check_space(path, total * (8 + 2 * (NUM_CLASSES + 1) * h * w))
        self.path = path
        self._atomic = atomic_path(path)
        self.tmp = self._atomic.__enter__()
        self.f = None
        self.digests = {k: hashlib.sha256() for k in ("ids", "probs", "disagreement")}
        self.n = 0
        try:
            with self._checked():
                self.f = h5py.File(self.tmp, "w")
                self.ids = self.f.create_dataset("ids", (total,), dtype="i8")
                self.probs = self.f.create_dataset("probs", (total, NUM_CLASSES, h, w),
                                                   dtype="f2", chunks=(1, NUM_CLASSES, h, w))
                self.dis = self.f.create_dataset("disagreement", (total, h, w), dtype="f2",
                                                 chunks=(1, h, w))
                for k, v in attrs.items():
                    self.f.attrs[k] = v
        except BaseException:
            self.discard()
            raise

    @contextlib.contextmanager
    def _checked(self):
        try:
            yield
        except (OSError, RuntimeError, ValueError) as e:
            if no_space(e):
                raise InputError(f"{self.path}: cannot write (no space left on device)") from None
            raise

    def write(self, r: BatchResult) -> None:
        s = slice(self.n, self.n + len(r.ids))
        with self._checked():
            self.ids[s] = r.ids
            self.probs[s] = r.probs
            self.dis[s] = r.disagreement
        for k, a in zip(self.digests, (r.ids, r.probs, r.disagreement), strict=True):
            self.digests[k].update(np.ascontiguousarray(a).tobytes())
        self.n += len(r.ids)

    def finish(self) -> None:
        """Close the file and check that it holds exactly what was written."""
        import h5py

        with self._checked():
            self.f.close()
            self.f = None
            back = {k: hashlib.sha256() for k in self.digests}
            with h5py.File(self.tmp, "r") as f:
                whole = f["ids"].shape[0] == self.n
                for s in range(0, self.n, 256):
                    for k, h in back.items():
                        h.update(np.ascontiguousarray(f[k][s:s + 256]).tobytes())
        if not whole or any(back[k].hexdigest() != self.digests[k].hexdigest() for k in back):
            raise InputError(f"{self.path}: the file written does not read back as written "
                             "(a full or failing disk?)")

    def commit(self) -> None:
        self._atomic.__exit__(None, None, None)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            if self.f is not None:
                self.f.close()
        with contextlib.suppress(RuntimeError):  # atomic_path removes the temporary file
            self._atomic.__exit__(RuntimeError, RuntimeError("discarded"), None)


def ready_predictor(ensemble: Ensemble, data: Source, split: str, cfg: PredictConfig,
                    rt: Resolved, *, workers: int = 0,
                    log: Callable[[str], None] | None = None,
                    n_images: int | None = None) -> Predictor | None:
    """The in-process Predictor, its backend converted or loaded from the cache; with
    ``workers`` > 1 only the conversion (the workers load it) and None. Before a
    conversion, the data is read once through every check: bad data must fail before
    a conversion is shown or cached. ``n_images`` (the split's count) caps the static
    batch of a converted network."""
    convert = needs_conversion(ensemble, cfg, rt, n_images)
    if convert:
        prescan(data, split, cfg.batch_size)
    if workers <= 1:
        return Predictor(ensemble, cfg, rt, log=log, calib_data=data, n_images=n_images)
    if convert:  # the workers load its cache
        Predictor(ensemble, cfg, rt, log=log, calib_data=data, n_images=n_images)
    return None


def _config(cfg: PredictConfig | None, overrides: dict) -> PredictConfig:
    cfg = cfg or PredictConfig()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(PredictConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown predict option(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@dataclasses.dataclass(frozen=True)
class PredictSummary:
    """What one `predict` call did (the CLI prints it; benches record it)."""

    rows: int  # images predicted, one CSV row each
    seconds: float  # the whole call after the checks, conversion or cache load included
    setup_seconds: float  # backend conversion or cache load
    images_per_s: float  # after the set-up
    models: tuple[str, ...]  # the ensemble's fold models, member/fold_k
    views: int  # test-time augmentation views
    precision: str
    backend: str
    device: str
    csv: str
    probs: str | None = None  # the probabilities file, when asked for

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "models": list(self.models)}

    @classmethod
    def from_json(cls, d: dict, where: str = "predict summary") -> PredictSummary:
        """From `to_json`'s dict; a missing key or a wrong type is an InputError naming it."""
        if not isinstance(d, dict):
            raise InputError(f"{where}: not a JSON object")
        values = {}
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.name not in d:
                raise InputError(f"{where}: no {f.name!r}")
            values[f.name] = typed(d, f.name, _SUMMARY_TYPES[f.name], f.default, where, "summary")
        if not all(isinstance(m, str) for m in values["models"]):
            raise InputError(f"{where}: malformed summary ('models' must be a list of names)")
        return cls(**{**values, "models": tuple(values["models"])})


_SUMMARY_TYPES = {"rows": (int,), "seconds": (float,), "setup_seconds": (float,),
                  "images_per_s": (float,), "models": (list,), "views": (int,),
                  "precision": (str,), "backend": (str,), "device": (str,), "csv": (str,),
                  "probs": (str, type(None))}


def _calibration(ensemble: Ensemble) -> dict:
    """Which temperatures the probabilities carry (the probs file's "calibration" attribute)."""
    return {"applied": ensemble.calibration, "temperature": ensemble.temperature,
            "members": {m.member: m.temperature for m in ensemble.models}}


@reads_data
def predict(run_dir: str | os.PathLike, data: str | os.PathLike, out_csv: str | os.PathLike, *,
            cfg: PredictConfig | None = None, members: Sequence[str] | None = None,
            folds: Sequence[int] | None = None, probs_path: str | os.PathLike | None = None,
            workers: int = 0, address: str | None = None, split: str = "test",
            progress: bool = False,
            on_batch: Callable[[BatchResult], None] | None = None, **options) -> PredictSummary:
    """Predict ``split`` of ``data`` with the run folder's ensemble and write the submission CSV.

    ``options`` override fields of ``cfg`` (e.g. ``tta=False, precision="no"``).
    Returns its `PredictSummary` (rows, seconds, images/s, models, views, precision, paths).
    Any failure (bad input, Ctrl-C) leaves neither CSV nor probs file behind.
    Configure once: the output paths, the data (opened once), the ensemble (loaded and its
    weights checked once) and device, precision and backend (`PredictConfig.resolve`) are
    settled here, before any work, and handed down.
    """
    cfg = _config(cfg, options)
    out_csv = check_out_path(out_csv)
    check_apart(out_csv, "--out", run=run_dir, data=data)
    if probs_path:
        probs_path = check_out_path(probs_path)
        if probs_path.resolve() == out_csv.resolve():
            raise InputError(f"{probs_path}: --probs is the same file as --out; give it its own "
                             "name (e.g. probs.h5)")
        check_apart(probs_path, "--probs", run=run_dir, data=data)
    src = open_checked(data)
    total = count_images(src, split)
    if (workers or 0) > 1:
        check_address(address)
    ensemble = load_ensemble(run_dir, members, folds)  # fail fast, before any work
    rt = cfg.resolve()  # a missing backend package fails here
    workers = workers or 0
    want = probs_path is not None
    t0 = time.perf_counter()
    pred = ready_predictor(ensemble, src, split, cfg, rt, workers=workers,
                           log=B.stderr_line if progress else None, n_images=total)
    t_setup = time.perf_counter()
    batches = stream_batches(src, split, cfg.batch_size)
    if workers > 1:
        results = _ray_results(run_dir, members, folds, cfg, rt, batches, workers, address,
                               want, want, total)
    else:
        results = (pred(ids, images, want_probs=want, want_disagreement=want)
                   for ids, images in batches)
    pw = w = None
    try:
        if want:
            pw = _ProbsWriter(probs_path, total, {
                "models": json.dumps(ensemble.names), "views": json.dumps(cfg.views),
                "classes": cfg.classes, "precision": rt.precision,
                "calibration": json.dumps(_calibration(ensemble))})
        with SubmissionWriter(out_csv, expected_rows=total, defer=True) as w, \
                progress_bar(total, "predict", progress) as advance:
            for r in results:
                w.write(r.ids, r.labels)
                if pw:
                    pw.write(r)
                if on_batch:
                    on_batch(r)
                advance(len(r.ids))
        if pw:
            pw.finish()
    except BaseException:
        for x in (pw, w):  # both outputs or neither
            if x is not None:
                x.discard()
        raise
    if pw:  # both are closed and checked: commit them together
        pw.commit()
    w.commit()
    t_end = time.perf_counter()
    return PredictSummary(rows=total, seconds=round(t_end - t0, 3),
                          setup_seconds=round(t_setup - t0, 3),
                          images_per_s=round(total / max(t_end - t_setup, 1e-9), 1),
                          models=tuple(ensemble.names), views=len(cfg.views),
                          precision=rt.precision, backend=rt.backend, device=str(rt.device),
                          csv=str(out_csv), probs=str(probs_path) if probs_path else None)
