"""Training throughput: train_one_fold vs the plain reference loop and vs a bare loop doing
the same work; 2 folds in parallel vs sequential.

1. `train_one_fold` on the real recipe (`ensembles/seed-final.toml`: half-width SE
   U-Net, base_width 16, depth 4, batch 32) at bf16, channels_last and 2 torch
   threads, on fold 0 of 64x128 synthetic images, against
   - the plain reference loop (`bench/plain_loop.py`, issue 10's yardstick: its own
     model, augmentation and loss, no marsseg training code) -- the goal:
     training-phase img/s >= 0.95x;
   - a bare loop: plain PyTorch around marsseg's own building blocks (model, the
     recipe's `augment.augment_batch`, class-weighted CE, AdamW, schedule, clipping,
     training filters), so that ratio is what train_one_fold's loop adds
     (accelerate, bookkeeping), not recipe content or implementation.
   Training-phase img/s is the figure metrics.jsonl shows per epoch. Beside it: the
   whole fold's wall time against the bare loop's training + one validation pass per
   epoch, and the costs train_one_fold adds per epoch and per fold, each timed alone
   on the same model (save_state, a best-weight save, the validation softmax kept for
   oof.h5, writing oof.h5). Runs are interleaved (plain, bare, fold, plain, ...) after
   an untimed warm-up and the best repeat is kept, so a load spike from other
   processes does not decide a ratio.
2. Two folds as two Ray tasks (1 CPU, 1 torch thread each) against the same two
   folds one after another in-process with 2 threads (`--sequential`), and with
   1 thread for reference, on a small net (scheduling, not model speed). Ray is
   started before the clock (a cluster is normally up already); its start-up time
   is reported separately.

BENCH_TRAIN_COMPILE=1 adds train_one_fold with compile=True (torch.compile, the
train-folds --compile flag): img/s of epochs after the first (steady state) and of the
first (which pays the compilation), against the uncompiled runs' same epochs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "ensembles" / "seed-final.toml"
THREADS = 2
PRECISION = "bf16"
SMALL_MODEL = {"base_width": 8, "depth": 3}  # part 2 only


def _small_recipe_file(path: Path, epochs: int, batch_size: int) -> Path:
    path.write_text(
        f"folds = 2\nseed = 0\n[[members]]\nname = \"bench\"\nepochs = {epochs}\n"
        f"batch_size = {batch_size}\ngrad_clip = 1.0\n[members.model]\nname = \"unet-se\"\n"
        f"args = {{ base_width = {SMALL_MODEL['base_width']}, depth = {SMALL_MODEL['depth']} }}\n"
        f"[members.optimizer]\nname = \"adamw\"\nlr = 2e-3\nweight_decay = 1e-4\n")
    return path


def bare_loop(member, images: np.ndarray, masks: np.ndarray, val_images: np.ndarray, *,
              epochs: int, threads: int) -> dict:
    """`member`'s training written as plainly as possible; returns train and validation seconds."""
    from marsseg import NUM_CLASSES
    from marsseg.augment import RockBank, RockImages, augment_batch
    from marsseg.losses import CombinedLoss, class_weights
    from marsseg.models.registry import build_model
    from marsseg.optim import lr_at

    torch.set_num_threads(threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(member.model.name, **member.model.args).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=member.optimizer.lr,
                            weight_decay=member.optimizer.weight_decay)
    counts = np.bincount(masks.reshape(-1), minlength=NUM_CLASSES)[:NUM_CLASSES]
    lc = member.loss
    weight = (class_weights(counts.tolist(), lc.class_weights, beta=lc.beta,
                            ignore_background=lc.ignore_background)
              if lc.class_weights != "none" else None)
    loss_fn = CombinedLoss(lc.terms, weight=weight, ignore_background=lc.ignore_background).to(dev)
    a = member.augment
    bank = RockBank.from_arrays(images, masks) if a.rock_target > 0 else None
    rocks = RockImages.from_arrays(images, masks, dev) if a.rock_paste > 0 else None
    x_all, y_all, xv = torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(val_images)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    aug = torch.Generator(device=dev).manual_seed(0)
    bs, n = member.batch_size, len(images)
    steps = n // bs
    train_s = val_s = 0.0
    step = 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=g)
        for s in range(0, steps * bs, bs):
            idx = perm[s:s + bs]
            for group in opt.param_groups:
                group["lr"] = lr_at(member.schedule, member.optimizer.lr, step, steps, epochs)
            x, y = augment_batch(x_all[idx].to(dev).unsqueeze(1).float(), y_all[idx].to(dev).long(),
                                 a, generator=aug, rock_images=rocks, rock_bank=bank)
            with torch.autocast(**amp):
                out = model(x.contiguous(memory_format=torch.channels_last))
            loss = loss_fn(out.float(), y)
            loss.backward()
            if member.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), member.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        t1 = time.perf_counter()
        train_s += t1 - t0
        model.eval()
        with torch.no_grad(), torch.autocast(**amp):
            for s in range(0, len(xv), 2 * bs):
                x = xv[s:s + 2 * bs].to(dev).unsqueeze(1).float()
                model(x.contiguous(memory_format=torch.channels_last))[:, 1:].argmax(1)
        val_s += time.perf_counter() - t1
    return {"train_s": train_s, "val_s": val_s, "images": steps * bs * epochs}


def bookkeeping_costs(member, tmp: Path, n_val: int, repeats: int) -> dict:
    """Seconds of what train_one_fold does besides training and validating, each timed alone
    (best of `repeats`) on the member's model after one optimizer step (AdamW moments exist)."""
    from marsseg import IMAGE_SHAPE, NUM_CLASSES
    from marsseg.checkpoint import save_state
    from marsseg.device import make_accelerator
    from marsseg.models.registry import build_model, save_pretrained
    from marsseg.runfolder import write_oof

    acc = make_accelerator(PRECISION, cpu=not torch.cuda.is_available())
    model = build_model(member.model.name, **member.model.args).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    x = torch.zeros(2, 1, *IMAGE_SHAPE, device=acc.device)
    model(x).float().mean().backward()
    opt.step()
    logits = torch.randn(n_val, NUM_CLASSES, *IMAGE_SHAPE)
    probs = np.empty((n_val, NUM_CLASSES, *IMAGE_SHAPE), np.float16)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times), 4)

    def keep_softmax():  # evaluate(probs_out=...): the softmax of every validation image, f16
        probs[:] = torch.softmax(logits.float(), dim=1).half().numpy()

    (tmp / "ck").mkdir(parents=True, exist_ok=True)
    return {
        "save_state_s": best(lambda: save_state(acc, tmp / "ck", {"epoch": 0})),
        "save_best_weights_s": best(lambda: save_pretrained(acc.unwrap_model(model), tmp / "best",
                                                            extra={"epoch": 0})),
        "keep_val_softmax_s": best(keep_softmax),
        "write_oof_h5_s": best(lambda: write_oof(tmp / "oof.h5", np.arange(n_val), probs)),
    }


def run(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    try:
        return _run(tmp, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_train_s(result: dict) -> float:
    """Training-phase seconds of a bench.plain_loop result (its history has img/s per epoch)."""
    per_epoch = (result["n_train"] // 32) * 32  # plain_loop: batch 32, drop_last
    return sum(per_epoch / h["img_s"] for h in result["history"])


def _fold_vs_bare(tmp: Path, split, recipe, member, epochs: int, repeats: int) -> dict:
    from bench import plain_loop
    from marsseg.folds import ensure_splits, fold_rows
    from marsseg.train import train_one_fold

    splits = ensure_splits(recipe, split, tmp / "warm")
    tr, va, _ = fold_rows(split, splits, 0, member)
    tr_x, tr_y, va_x = split.images[tr], split.masks[tr], split.images[va]
    bare_loop(member, tr_x[:2 * member.batch_size], tr_y[:2 * member.batch_size],
              va_x[:member.batch_size], epochs=1, threads=THREADS)  # untimed: kernel selection
    bare, plain, fold, fold_wall, fold_rows_img_s = [], [], [], [], []
    for r in range(repeats):
        plain.append(plain_loop.train(tmp / "shards", tmp / "warm" / "splits.json", 0, epochs, 0,
                                      THREADS, log=lambda *a: None))
        bare.append(bare_loop(member, tr_x, tr_y, va_x, epochs=epochs, threads=THREADS))
        t0 = time.perf_counter()
        done = train_one_fold(recipe, member, 0, split, tmp / f"fold-{r}", precision=PRECISION,
                              threads=THREADS)
        fold_wall.append(time.perf_counter() - t0)
        fold.append(done)
        rows = (tmp / f"fold-{r}" / member.name / "fold_0" / "metrics.jsonl").read_text().splitlines()
        fold_rows_img_s.append([json.loads(x)["img_s"] for x in rows])
    n_img = bare[0]["images"]  # both drop the last partial batch: the same images per epoch
    bare_train = min(b["train_s"] for b in bare)
    bare_wall = min(b["train_s"] + b["val_s"] for b in bare)
    fold_train = min(d.train_seconds for d in fold)
    plain_train = min(_plain_train_s(p) for p in plain)
    plain_img = (plain[0]["n_train"] // 32) * 32 * epochs
    return {
        "n_train_fold": int(len(tr)), "n_val_fold": int(len(va)),
        # the goal: the plain reference loop (bench/plain_loop.py), its own model and augmentation
        "plain_train_img_s": round(plain_img / plain_train, 2),
        "ratio_train_vs_plain": round((n_img / fold_train) / (plain_img / plain_train), 3),
        "plain_train_s": [round(_plain_train_s(p), 3) for p in plain],
        # what the loop adds: a bare loop around marsseg's own model, augmentation and loss
        "bare_train_img_s": round(n_img / bare_train, 2),
        "train_one_fold_train_img_s": round(n_img / fold_train, 2),
        "ratio_train": round(bare_train / fold_train, 3),
        "train_one_fold_img_s_per_epoch": fold_rows_img_s,
        "bare_train_plus_val_s": [round(b["train_s"] + b["val_s"], 3) for b in bare],
        "bare_val_s_per_epoch": round(min(b["val_s"] for b in bare) / epochs, 3),
        "train_one_fold_wall_s": [round(s, 3) for s in fold_wall],
        "train_one_fold_train_s": [round(d.train_seconds, 3) for d in fold],
        "ratio_wall": round(bare_wall / min(fold_wall), 3),
    }


def _steady_img_s(rows: list[list[float]]) -> float | None:
    """Best repeat's mean img/s over epochs after the first (None with one epoch)."""
    later = [float(np.mean(r[1:])) for r in rows if len(r) > 1]
    return max(later) if later else None


def _compiled(tmp: Path, split, recipe, member, repeats: int, plain_rows: list[list[float]]) -> dict:
    from marsseg.train import train_one_fold

    rows, walls = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        train_one_fold(recipe, member, 0, split, tmp / f"compiled-{r}", precision=PRECISION,
                       threads=THREADS, compile=True)
        walls.append(round(time.perf_counter() - t0, 3))
        lines = (tmp / f"compiled-{r}" / member.name / "fold_0" / "metrics.jsonl").read_text()
        rows.append([json.loads(x)["img_s"] for x in lines.splitlines()])
    steady, plain = _steady_img_s(rows), _steady_img_s(plain_rows)
    return {"img_s_per_epoch": rows, "wall_s": walls,
            "speedup_after_first_epoch": round(steady / plain, 3) if steady and plain else None,
            "first_epoch_img_s": max(r[0] for r in rows)}


def _parallel_vs_sequential(tmp: Path, split) -> dict:
    import ray

    from marsseg.cluster import start_ray
    from marsseg.orchestrate import RunOptions, train_folds

    recipe_path = _small_recipe_file(tmp / "small.toml", epochs=3, batch_size=16)
    seq = {}
    for t in (2, 1):
        t0 = time.perf_counter()
        train_folds(recipe_path, tmp / "shards", tmp / f"seq{t}",
                    RunOptions(sequential=True, threads=t, precision=PRECISION, progress="none"))
        seq[t] = time.perf_counter() - t0
    t0 = time.perf_counter()
    start_ray()  # as train-folds does: private instance, all CPUs, workers at niceness 0
    ray_init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        train_folds(recipe_path, tmp / "shards", tmp / "par",
                    RunOptions(cpus_per_task=1, threads=1, precision=PRECISION, progress="none"))
        par_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "model": {"name": "unet-se", **SMALL_MODEL}, "epochs": 3,
        "parallel_2x1thread_s": round(par_s, 3), "sequential_2threads_s": round(seq[2], 3),
        "speedup": round(seq[2] / par_s, 3), "ray_init_s": round(ray_init_s, 3),
        "speedup_incl_ray_start": round(seq[2] / (par_s + ray_init_s), 3),
        "sequential_1thread_s": round(seq[1], 3),
        "speedup_vs_sequential_1thread": round(seq[1] / par_s, 3),
    }


def _run(tmp: Path, quick: bool) -> dict:
    from marsseg.config import load_recipe, with_epochs
    from marsseg.data import load_split, prepare
    from marsseg.synth import write_synthetic

    n_train = 200 if quick else 1280
    epochs = 1 if quick else 2
    repeats = 1 if quick else 3
    write_synthetic(tmp / "s.npz", n_train, 8, seed=0)
    prepare(tmp / "s.npz", tmp / "shards")
    split = load_split(tmp / "shards", "train")
    recipe = with_epochs(load_recipe(RECIPE), epochs)
    member = recipe.members[0]
    load_before = os.getloadavg()[0]

    fold_vs_bare = _fold_vs_bare(tmp, split, recipe, member, epochs, repeats)
    costs = bookkeeping_costs(member, tmp / "costs", fold_vs_bare["n_val_fold"], 3)
    epoch_s = (fold_vs_bare["n_train_fold"] / fold_vs_bare["train_one_fold_train_img_s"]
               + fold_vs_bare["bare_val_s_per_epoch"])
    per_epoch = costs["save_state_s"] + costs["keep_val_softmax_s"]
    costs["per_epoch_share_of_epoch"] = round(per_epoch / epoch_s, 4)  # + a best save when it improves
    result = {
        "setup": {"recipe": RECIPE.name, "model": {"name": member.model.name, **member.model.args},
                  "batch_size": member.batch_size, "epochs": epochs, "precision": PRECISION,
                  "threads": THREADS, "channels_last": True, "n_train_synthetic": n_train,
                  "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "repeats": repeats},
        "fold_vs_bare": fold_vs_bare,
        "bookkeeping_s": costs,
    }
    if os.environ.get("BENCH_TRAIN_COMPILE") == "1":
        result["compile"] = _compiled(tmp, split, recipe, member, repeats,
                                      fold_vs_bare["train_one_fold_img_s_per_epoch"])
    result["parallel_vs_sequential"] = _parallel_vs_sequential(tmp, split)
    result["setup"]["loadavg_1min_before_after"] = [round(load_before, 2),
                                                    round(os.getloadavg()[0], 2)]
    return result


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
