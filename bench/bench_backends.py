"""Inference backends side by side: eager fp32, eager bf16, compile, openvino, openvino-int8.

Measured in one run on the same 5-member full-width ensemble (``unet``, base
width 32, random weights with spread BN statistics, as bench_predict) and the
same images, flip TTA (2 views), the real ``Predictor`` for every row:

- images/s after one warm-up batch, and the ratio to eager bf16 (the CPU default);
- drift: share of mask pixels whose label differs from eager fp32 (same inputs);
- first-call cost (conversion, cached in the fold folders) and the second
  construction, which loads the cache;
- projection: minutes for 10,022 images x 5 members x 2 views at the measured rate;
- openvino at several batch sizes (static shape = batch x views), to pick the batch.

Backends whose package is missing are listed under ``skipped`` with the reason.
Random-init members predict nearly one class everywhere, so their drift says
little. With ``BENCH_TRAINED_RUN`` (a trained run folder) and ``BENCH_TRAINED_DATA``
(labeled shards, e.g. real-mars with its gold test masks) the bench also predicts
that data's test split with the run's ``BENCH_TRAINED_FOLDS`` (default 0) under every
backend: drift vs eager fp32 on trained nets and the mIoU each backend scores
(the default's rule: <= 0.5% of pixels off fp32, mIoU moving < 0.1).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_predict import N_FULL, _make_run, _timed

CANDIDATES = [("compile", "bf16"), ("openvino", "bf16"), ("openvino", "no"),
              ("openvino-int8", "bf16")]


def _shards(d: Path, n_train: int, n_test: int) -> Path:
    from marsseg.data import prepare
    from marsseg.synth import write_synthetic

    npz = d / "synth.npz"
    write_synthetic(npz, n_train, n_test, seed=0)
    prepare(npz, d / "shards", shard_size=256)
    return d / "shards"


def _row(pred_factory, images, batch, ref, base_ips, members) -> dict:
    """Build the predictor twice (conversion, then cache), time it, compare with fp32."""
    t0 = time.perf_counter()
    pred_factory()
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = pred_factory()
    second_s = time.perf_counter() - t0
    t, lab = _timed(pred, images, batch)
    ips = len(images) / t
    out = {"images_per_s": round(ips, 2), "first_call_s": round(first_s, 1),
           "cached_load_s": round(second_s, 1),
           "pixels_differing_from_fp32": round(float((lab != ref).mean()), 5),
           "projected_minutes_10022x5x2": round(N_FULL / ips * 5 / members / 60, 1)}
    if base_ips:
        out["ratio_vs_eager_bf16"] = round(ips / base_ips, 2)
    return out, lab


def run(quick: bool = False) -> dict:
    from marsseg import backends as B
    from marsseg.data import load_split
    from marsseg.device import cpu_bf16_fast
    from marsseg.ensemble import load_ensemble
    from marsseg.inference import PredictConfig, Predictor
    from marsseg.quantize import CALIBRATION_IMAGES

    members = 2 if quick else 5
    width = 8 if quick else 32
    n = 16 if quick else 256
    batch = 8 if quick else 64
    out: dict = {"load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
                 "threads": torch.get_num_threads(), "cpu_bf16_native": cpu_bf16_fast(),
                 "members": members, "views": 2, "images": n, "batch_size": batch,
                 "model": f"unet base_width={width} depth=4", "quick": quick,
                 "goal_ratio": 2.0, "moonshot_ratio": 4.0, "max_pixels_differing": 0.005}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run_dir = _make_run(d / "run", members, {"base_width": width})
        shards = _shards(d, CALIBRATION_IMAGES if not quick else 32, n)
        images = load_split(shards, "test").images[:n]

        def factory(backend, precision, bs=batch):
            cfg = PredictConfig(batch_size=bs, precision=precision, backend=backend)
            return lambda: Predictor(load_ensemble(run_dir), cfg, calib_data=shards)

        t, ref = _timed(factory("eager", "no")(), images, batch)
        out["eager_fp32"] = {"images_per_s": round(n / t, 2),
                             "projected_minutes_10022x5x2": round(N_FULL / (n / t) * 5
                                                                  / members / 60, 1)}
        out["eager_bf16"], _ = _row(factory("eager", "bf16"), images, batch, ref, None, members)
        base = out["eager_bf16"]["images_per_s"]
        out["backends"], out["skipped"] = {}, {}
        for backend, precision in CANDIDATES:
            name = f"{backend}-{'fp32' if precision == 'no' else precision}"
            try:
                B.resolve(backend, torch.device("cpu"))
            except B.InputError as e:  # names the missing package and the extra to install
                out["skipped"][name] = str(e)
                continue
            try:
                out["backends"][name], _ = _row(factory(backend, precision), images, batch, ref,
                                                base, members)
            except Exception as e:  # a conversion that fails here is a finding, not a crash
                out["skipped"][name] = f"{type(e).__name__}: {str(e)[:300]}"
        if B.available("openvino"):
            sweep = {}
            for bs in ((4, 8) if quick else (16, 32, 64, 128)):
                pred = factory("openvino", "bf16", bs)()
                t, _ = _timed(pred, images, bs)
                sweep[str(bs)] = round(n / t, 2)
            out["openvino_bf16_images_per_s_by_batch"] = sweep
    trained = _trained_drift(batch)
    if trained:
        out["trained"] = trained
    drift = (trained or {}).get("backends") or out["backends"]
    ok = {k: v for k, v in out["backends"].items()
          if k in drift and drift[k]["pixels_differing_from_fp32"] <= out["max_pixels_differing"]
          and abs(drift[k].get("miou_delta_vs_eager_bf16", 0.0)) < 0.1}
    out["fastest_within_drift"] = max(ok, key=lambda k: ok[k]["images_per_s"]) if ok else None
    out["note"] = ("speed on random-init members; drift and mIoU "
                   + ("on the trained run (see 'trained')" if trained else
                      "NOT checked on trained nets: set BENCH_TRAINED_RUN and BENCH_TRAINED_DATA")
                   + ("; QUICK: small nets, timings meaningless" if quick else ""))
    out["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return out


def _trained_drift(batch: int) -> dict | None:
    """Drift vs eager fp32 and mIoU per backend on a trained run's predictions of labeled
    test data (BENCH_TRAINED_RUN, BENCH_TRAINED_DATA, BENCH_TRAINED_FOLDS); None if unset."""
    from marsseg import backends as B
    from marsseg.data import load_split
    from marsseg.ensemble import load_ensemble
    from marsseg.inference import PredictConfig, Predictor
    from marsseg.metrics import confusion_matrix, course_miou

    run, data = os.environ.get("BENCH_TRAINED_RUN"), os.environ.get("BENCH_TRAINED_DATA")
    if not run or not data:
        return None
    folds = [int(f) for f in os.environ.get("BENCH_TRAINED_FOLDS", "0").split(",")]
    test = load_split(Path(data), "test")
    if test.masks is None:
        raise SystemExit(f"BENCH_TRAINED_DATA {data}: its test split has no masks")

    def predict(backend: str, precision: str):
        cfg = PredictConfig(batch_size=batch, precision=precision, backend=backend)
        pred = Predictor(load_ensemble(run, folds=folds), cfg, calib_data=data)
        _, lab = _timed(pred, test.images, batch, warm=False)
        return lab, round(100 * course_miou(confusion_matrix(lab, test.masks)), 2)

    ref, ref_miou = predict("eager", "no")
    bf16, bf16_miou = predict("eager", "bf16")
    res = {"run": run, "data": data, "folds": folds, "images": len(test), "views": 2,
           "eager_fp32_miou": ref_miou,
           "eager_bf16": {"pixels_differing_from_fp32": round(float((bf16 != ref).mean()), 5),
                          "miou": bf16_miou},
           "backends": {}}
    for backend, precision in CANDIDATES:
        name = f"{backend}-{'fp32' if precision == 'no' else precision}"
        if not B.available(backend):
            continue
        lab, miou = predict(backend, precision)
        res["backends"][name] = {"pixels_differing_from_fp32": round(float((lab != ref).mean()), 5),
                                 "miou": miou, "miou_delta_vs_eager_bf16": round(miou - bf16_miou, 2)}
    return res
