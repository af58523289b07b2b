"""Predict throughput: optimized ensemble predictor vs a naive loop, bf16 drift, flat memory.

Measured side by side in one run on the same 5-member full-width ensemble
(``unet``, base width 32, random weights with spread BN statistics) and the
same images:

- naive: fp32, contiguous, one member and one view at a time, batch 1;
- ladder: the real ``Predictor`` with batched views, then + channels_last, then
  + bf16 autocast (the default on CPUs with native bf16), then + torch.compile;
- end to end: ``predict()`` from HDF5 shards to a validated CSV;
- bf16 vs fp32: share of mask pixels that differ (same inputs, same models);
- memory: peak RSS of ``predict()`` on N and 4N images, each in a fresh subprocess;
- projection: 10,022 images x 5 members x 2 views at the measured end-to-end rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
N_FULL = 10022


def _make_run(run: Path, members: int, args: dict, seed: int = 0) -> Path:
    from marsseg._io import sha256_file
    from marsseg.models.registry import build_model, save_pretrained

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for k in range(members):
        m = build_model("unet", **args)
        for mod in m.modules():  # untrained BN stats make nets near-constant; spread them
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
        folder = save_pretrained(m, run / f"m{k}" / "fold_0", {"member": f"m{k}", "fold": 0})
        entries.append({"name": f"m{k}", "weight": 1.0, "folds": [
            {"fold": 0, "path": f"m{k}/fold_0", "sha256": sha256_file(folder / "model.safetensors")}]})
    spec = {"format_version": 1, "name": run.name, "k": 1, "members": entries,
            "selected": [e["name"] for e in entries]}
    (run / "ensemble.json").write_text(json.dumps(spec))
    return run


def _make_shards(d: Path, n: int, seed: int = 0) -> Path:
    from marsseg.data import prepare
    from marsseg.synth import write_synthetic

    npz = d / f"synth{n}.npz"
    write_synthetic(npz, 8, n, seed=seed)
    out = d / f"shards{n}"
    prepare(npz, out, shard_size=256)
    return out


def _test_images(shards: Path, n: int) -> np.ndarray:
    from marsseg.data import load_split

    return load_split(shards, "test").images[:n]


def _naive(ensemble, images: np.ndarray) -> tuple[float, np.ndarray]:
    """fp32, contiguous, each member and each view separately, one image at a time."""
    models = [m.model.to(memory_format=torch.contiguous_format) for m in ensemble.models]
    weights = [m.weight for m in ensemble.models]
    labels = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for img in images:
            x = torch.from_numpy(img)[None, None].float()
            acc = torch.zeros(1, 5, *img.shape)
            for m, w in zip(models, weights, strict=True):
                p0 = torch.softmax(m(x), 1)
                p1 = torch.softmax(m(x.flip(-1)), 1).flip(-1)
                acc += w * (p0 + p1) / 2
            labels.append((acc[:, 1:].argmax(1) + 1).to(torch.uint8))
    return time.perf_counter() - t0, torch.cat(labels).numpy()


def _timed(pred, images: np.ndarray, batch: int, warm: bool = True) -> tuple[float, np.ndarray]:
    ids = np.arange(len(images))
    if warm:
        pred(ids[:batch], images[:batch])
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        out.append(pred(ids[s:s + batch], images[s:s + batch]).labels)
    return time.perf_counter() - t0, np.concatenate(out)


def _compile_probe(run_dir: Path, images: np.ndarray, batch: int) -> dict:
    """torch.compile on ONE member (compiling all five costs five compiles): does it pay?"""
    from marsseg.ensemble import load_ensemble
    from marsseg.inference import PredictConfig, Predictor

    one = ["m0"]
    res = {"members": 1}
    try:
        eager = Predictor(load_ensemble(run_dir, one), PredictConfig(batch_size=batch))
        t_eager, lab_e = _timed(eager, images, batch)
        t0 = time.perf_counter()  # compile=True is backend "compile": it converts when built
        comp = Predictor(load_ensemble(run_dir, one), PredictConfig(batch_size=batch,
                                                                   compile=True))
        comp(np.arange(batch), images[:batch])
        compile_s = time.perf_counter() - t0
        t_comp, lab_c = _timed(comp, images, batch, warm=False)
        gain = (t_eager - t_comp) / len(images)
        res.update({"eager_images_per_s": round(len(images) / t_eager, 2),
                    "compiled_images_per_s": round(len(images) / t_comp, 2),
                    "speedup": round(t_eager / t_comp, 2), "compile_s": round(compile_s, 1),
                    "pays_after_images": int(compile_s / gain) if gain > 0 else None,
                    "pixels_differing": float((lab_e != lab_c).mean())})
    except Exception as e:  # no compiler toolchain etc.
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


_RSS_CHILD = r"""
import json, resource, sys
from marsseg.predict import predict
from marsseg.inference import PredictConfig
run, data, out, probs = sys.argv[1:5]
r = predict(run, data, out, cfg=PredictConfig(batch_size=64), probs_path=probs)
print(json.dumps({"rows": r.rows, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _peak_rss(run: Path, shards: Path, d: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(run), str(shards),
                          str(d / "rss.csv"), str(d / "rss.h5")], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    from marsseg.ensemble import load_ensemble
    from marsseg.inference import PredictConfig, Predictor
    from marsseg.predict import predict

    members = 5
    n_naive = 1 if quick else 3
    n_fast = 16 if quick else 64
    batch = 16 if quick else 32
    out: dict = {"load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
                 "threads": torch.get_num_threads(), "members": members, "views": 2,
                 "model": "unet base_width=32 depth=4", "cpu_bf16_native": None}
    from marsseg.device import cpu_bf16_fast
    out["cpu_bf16_native"] = cpu_bf16_fast()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run_dir = _make_run(d / "run", members, {"base_width": 32})
        shards = _make_shards(d, n_fast)
        images = _test_images(shards, n_fast)
        ens = load_ensemble(run_dir)
        from marsseg.models.registry import count_parameters
        out["params_per_member_m"] = round(count_parameters(ens.models[0].model) / 1e6, 2)

        t_naive, lab_naive = _naive(ens, images[:n_naive])
        naive_ips = n_naive / t_naive
        out["naive"] = {"images": n_naive, "seconds": round(t_naive, 2),
                        "images_per_s": round(naive_ips, 3)}

        ladder = {}
        labels = {}
        for name, cfg in [
            ("batched_views_fp32", PredictConfig(precision="no", channels_last=False,
                                                 batch_size=batch)),
            ("+channels_last", PredictConfig(precision="no", channels_last=True,
                                             batch_size=batch)),
            ("+bf16", PredictConfig(precision="bf16", channels_last=True, batch_size=batch)),
        ]:
            pred = Predictor(load_ensemble(run_dir), cfg)
            t, lab = _timed(pred, images, batch)
            labels[name] = lab
            ladder[name] = {"seconds": round(t, 2), "images_per_s": round(len(images) / t, 2),
                            "speedup_vs_naive": round(len(images) / t / naive_ips, 1)}
            del pred
        if not quick:
            out["compile_probe"] = _compile_probe(run_dir, images, batch)
        out["ladder"] = ladder
        naive_vs = labels["batched_views_fp32"][:n_naive]
        out["naive_equals_batched_fp32"] = float((naive_vs != lab_naive).mean())
        out["bf16_pixels_differing_from_fp32"] = float(
            (labels["+bf16"] != labels["+channels_last"]).mean())

        # end to end: shards -> validated CSV with the default config (auto precision)
        t0 = time.perf_counter()
        r = predict(run_dir, shards, d / "sub.csv", cfg=PredictConfig(batch_size=batch))
        e2e = time.perf_counter() - t0
        out["end_to_end"] = {"images": n_fast, "seconds_incl_loading": round(e2e, 2),
                             "images_per_s": r.images_per_s, "precision": r.precision}
        best_ips = max(v.get("images_per_s", 0) for v in ladder.values())
        out["speedup_best_vs_naive"] = round(best_ips / naive_ips, 1)
        out["speedup_end_to_end_vs_naive"] = round(r.images_per_s / naive_ips, 1)
        out["goal_speedup"] = 8
        out["projected_minutes_10022x5x2"] = round(N_FULL / r.images_per_s / 60, 1)
        out["projected_minutes_10022x5x2_naive"] = round(N_FULL / naive_ips / 60, 1)
        out["goal_minutes"] = 6

        # memory: same pipeline on N and 4N images, small nets so it stays quick
        n_small = 64 if quick else 256
        small = _make_run(d / "small", 2, {"base_width": 8})
        rss = {}
        for n in (n_small, 4 * n_small):
            rss[n] = _peak_rss(small, _make_shards(d, n, seed=n), d)
        a, b = rss[n_small]["maxrss_mb"], rss[4 * n_small]["maxrss_mb"]
        out["peak_rss"] = {"images": [n_small, 4 * n_small], "mb": [round(a, 1), round(b, 1)],
                           "growth": round(b / a - 1, 4), "goal_growth": 0.10,
                           "note": "fresh subprocess each; 2-member width-8 ensemble, TTA, "
                                   "shards -> CSV + probs.h5"}
    out["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return out
