"""Training throughput: train_one_fold vs a bare PyTorch loop; 2 folds in parallel vs sequential.

1. Per-fold throughput (training images / wall second) of `train_one_fold` against
   a bare PyTorch loop over the same model, data (in memory), batch size,
   precision, channels_last and grad clipping, with one inference pass over the
   validation part per epoch in both. train_one_fold's wall time includes
   everything it does besides: accelerate set-up, metrics, best-weight saves,
   save_state every epoch, the OOF pass and oof.h5. Runs are interleaved
   (bare, fold, bare, fold, ...) and the best of the repeats is kept, so a load
   spike from other processes does not decide the ratio; the CPU-time ratio of
   the same runs (1 thread) is reported beside it. Goal: >= 0.95x.
2. Two folds as two Ray tasks (1 CPU, 1 torch thread each) against the same two
   folds one after another in-process with 2 threads (`--sequential`), and with
   1 thread for reference. Ray is started before the clock (a cluster is
   normally up already); its start-up time is reported separately.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

MODEL = {"base_width": 8, "depth": 3}


def _recipe_file(path: Path, epochs: int, batch_size: int) -> Path:
    path.write_text(
        f"folds = 2\nseed = 0\n[[members]]\nname = \"bench\"\nepochs = {epochs}\n"
        f"batch_size = {batch_size}\ngrad_clip = 1.0\n[members.model]\nname = \"unet-se\"\n"
        f"args = {{ base_width = {MODEL['base_width']}, depth = {MODEL['depth']} }}\n"
        f"[members.optimizer]\nname = \"adamw\"\nlr = 2e-3\nweight_decay = 1e-4\n")
    return path


def bare_loop(images: np.ndarray, masks: np.ndarray, val_images: np.ndarray, *, epochs: int,
              batch_size: int, precision: str, threads: int) -> float:
    """The same training written as plainly as possible; returns wall seconds."""
    import torch.nn.functional as F

    from marsseg.models.registry import build_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model("unet-se", **MODEL).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(masks)
    xv = torch.from_numpy(val_images)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    g = torch.Generator().manual_seed(0)
    n = len(images)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            x = x_all[idx].to(dev).unsqueeze(1).float().contiguous(memory_format=torch.channels_last)
            y = y_all[idx].to(dev).long()
            with torch.autocast(**amp):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), torch.autocast(**amp):
            for s in range(0, len(xv), 2 * batch_size):
                x = xv[s:s + 2 * batch_size].to(dev).unsqueeze(1).float()
                model(x.contiguous(memory_format=torch.channels_last)).argmax(1)
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        return _run(tmp, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path, quick: bool) -> dict:
    from marsseg.config import load_recipe
    from marsseg.data import load_split, prepare
    from marsseg.orchestrate import RunOptions, start_ray, train_folds
    from marsseg.synth import write_synthetic
    from marsseg.train import ensure_splits, fold_rows, train_one_fold

    n_train = 128 if quick else 512
    epochs = 1 if quick else 3
    bs = 16
    threads = 1
    repeats = 1 if quick else 3
    precision = "bf16"
    write_synthetic(tmp / "s.npz", n_train, 8, seed=0)
    prepare(tmp / "s.npz", tmp / "shards")
    split = load_split(tmp / "shards", "train")
    recipe_path = _recipe_file(tmp / "bench.toml", epochs, bs)
    recipe = load_recipe(recipe_path)
    splits = ensure_splits(recipe, split, tmp / "warm")
    tr, va, _ = fold_rows(split, splits, 0, recipe.members[0])
    n_imgs = (len(tr) // bs) * bs * epochs  # both drop the last partial batch

    # 1. train_one_fold vs bare loop, interleaved, after an untimed warm-up (kernel selection)
    bare_loop(split.images[tr][:2 * bs], split.masks[tr][:2 * bs], split.images[va][:bs], epochs=1,
              batch_size=bs, precision=precision, threads=threads)
    bare_s, fold_s, fold_train_s, bare_cpu, fold_cpu = [], [], [], [], []
    load_before = os.getloadavg()[0]
    for r in range(repeats):
        c0 = time.process_time()
        bare_s.append(bare_loop(split.images[tr], split.masks[tr], split.images[va], epochs=epochs,
                                batch_size=bs, precision=precision, threads=threads))
        bare_cpu.append(time.process_time() - c0)
        out = tmp / f"fold-{r}"
        t0, c0 = time.perf_counter(), time.process_time()
        done = train_one_fold(recipe, "bench", 0, split, out, precision=precision, threads=threads)
        fold_s.append(time.perf_counter() - t0)
        fold_cpu.append(time.process_time() - c0)
        fold_train_s.append(done["train_seconds"])
    bare_ips = n_imgs / min(bare_s)
    fold_ips = n_imgs / min(fold_s)

    # 2. two folds: Ray tasks (1 thread each) vs sequential in-process (2 threads); the
    # sequential 1-thread figure separates "parallel folds" from "2 threads on a small net".
    seq = {}
    for t in (2, 1):
        t0 = time.perf_counter()
        train_folds(recipe_path, tmp / "shards", tmp / f"seq{t}",
                    RunOptions(sequential=True, threads=t, precision=precision, progress="none"))
        seq[t] = time.perf_counter() - t0
    import ray

    t0 = time.perf_counter()
    start_ray()  # as train-folds does: private instance, all CPUs, workers at niceness 0
    ray_init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        train_folds(recipe_path, tmp / "shards", tmp / "par",
                    RunOptions(cpus_per_task=1, threads=1, precision=precision, progress="none"))
        par_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    seq_s = seq[2]

    return {
        "setup": {"n_train_fold": int(len(tr)), "n_val_fold": int(len(va)), "epochs": epochs,
                  "batch_size": bs, "model": {"name": "unet-se", **MODEL}, "precision": precision,
                  "threads": threads, "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "repeats": repeats,
                  "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "fold_vs_bare": {
            "bare_img_s": round(bare_ips, 2), "train_one_fold_img_s": round(fold_ips, 2),
            "ratio": round(fold_ips / bare_ips, 3),
            "bare_s": [round(s, 3) for s in bare_s], "train_one_fold_s": [round(s, 3) for s in fold_s],
            "train_one_fold_train_phase_s": [round(s, 3) for s in fold_train_s],
            # CPU seconds of this process (1 torch thread): robust to other load on a shared machine
            "bare_cpu_s": [round(s, 3) for s in bare_cpu],
            "train_one_fold_cpu_s": [round(s, 3) for s in fold_cpu],
            "ratio_cpu_time": round(min(bare_cpu) / min(fold_cpu), 3),
        },
        "parallel_vs_sequential": {
            "parallel_2x1thread_s": round(par_s, 3), "sequential_2threads_s": round(seq_s, 3),
            "speedup": round(seq_s / par_s, 3), "ray_init_s": round(ray_init_s, 3),
            "speedup_incl_ray_start": round(seq_s / (par_s + ray_init_s), 3),
            "sequential_1thread_s": round(seq[1], 3),
            "speedup_vs_sequential_1thread": round(seq[1] / par_s, 3),
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
