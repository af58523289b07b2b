"""The plain PyTorch reference loop: the yardstick every marsseg recipe change is judged by.

Deliberately independent of marsseg's training code (model, augmentation, loss,
schedule, metric are written out here), it trains the reference report's final
recipe as its text reads (issue 10):

  U-Net, 4 pooling levels (b, 2b, 4b, 8b, bottleneck 16b), block = 2 x (conv3x3 + BN
  + ReLU), nearest x2 up + skip concat, 1x1 head; one SE block (reduction 16) after
  the bottleneck; PyTorch's default initialisation; input / 255.
  Augment: per-sample hflip p=0.5; CutMix once per batch with p=0.5 (one Beta(1,1)
  box, a permutation of the batch, image and mask); class-4 paste per sample with
  p=0.5 (all big-rock pixels of one random big-rock training image, same position).
  Loss: cross entropy, ignore_index=0, weights 1/sqrt(freq) for classes 1-4
  normalised to mean 1. AdamW lr 1e-3, weight decay 1e-4 on every parameter, cosine
  per step from lr to 0, no warmup, no clipping; batch 32, drop_last. Training
  images with > 80% background dropped (validation keeps all). bf16 autocast,
  channels_last. Prediction: argmax over classes 1-4; best epoch by validation mIoU.

It reads marsseg's prepared shards and a run folder's splits.json, so it trains and
validates on exactly the fold marsseg does, then scores the best epoch on the
labeled test split (gold) with and without flip TTA.

    python -m bench.plain_loop --data SHARDS --splits RUN/splits.json --fold 0 \
        --epochs 30 --seed 0 --out DIR          # writes DIR/plain.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 5


# --- data ---------------------------------------------------------------------------------


def read_split(shards: Path, split: str) -> dict[str, np.ndarray]:
    """images, masks, ids (and outlier flags when present) of every `<split>-*.h5` shard."""
    parts: dict[str, list] = {}
    for p in sorted(Path(shards).glob(f"{split}-*.h5")):
        with h5py.File(p, "r") as f:
            for k in ("images", "masks", "ids", "outlier"):
                if k in f:
                    parts.setdefault(k, []).append(f[k][()])
    if not parts:
        raise SystemExit(f"{shards}: no {split}-*.h5 shards")
    return {k: np.concatenate(v) for k, v in parts.items()}


# --- model --------------------------------------------------------------------------------


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SE(nn.Module):
    def __init__(self, c: int, r: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(c // r, c, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x)


class UNet(nn.Module):
    def __init__(self, base: int = 16, depth: int = 4, classes: int = NUM_CLASSES):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = 1
        for w in widths[:-1]:
            self.down.append(block(cin, w))
            cin = w
        self.bottleneck = nn.Sequential(block(cin, widths[-1]), SE(widths[-1]))
        self.up = nn.ModuleList(block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        x = x / 255.0
        skips = []
        for d in self.down:
            x = d(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for u, s in zip(self.up, reversed(skips), strict=True):
            x = u(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), s], 1))
        return self.head(x)


# --- augmentation -------------------------------------------------------------------------


def augment(x: torch.Tensor, y: torch.Tensor, rock_x: torch.Tensor, rock_m: torch.Tensor,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x float (B,1,H,W) 0..255, y int64 (B,H,W); rock_x/rock_m: big-rock training images/masks."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    y = torch.where(flip[:, None, None], y.flip(2), y)
    if torch.rand(1, generator=g).item() < 0.5:  # CutMix: one box, one permutation, per batch
        lam = torch.rand(1, generator=g).item()  # Beta(1, 1) is uniform
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        perm = torch.randperm(b, generator=g)
        x, y = x.clone(), y.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        y[:, y0:y1, x0:x1] = y[perm, y0:y1, x0:x1]
    if len(rock_x):  # class-4 paste: each sample with p=0.5 gets one rock image's rock pixels
        paste = torch.rand(b, generator=g) < 0.5
        src = torch.randint(len(rock_x), (b,), generator=g)
        m = rock_m[src] & paste[:, None, None]
        x = torch.where(m[:, None], rock_x[src][:, None].float(), x)
        y = torch.where(m, torch.full_like(y, 4), y)
    return x, y


# --- metric ---------------------------------------------------------------------------------


def confusion(pred: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    t = truth.reshape(-1).long()
    keep = t > 0
    idx = t[keep] * NUM_CLASSES + pred.reshape(-1).long()[keep]
    return torch.bincount(idx, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES).numpy()


def course_scores(cm: np.ndarray) -> tuple[float, list[float | None]]:
    """Course mIoU (truth-0 pixels dropped, classes with empty union skipped) and per-class IoU."""
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = [float(i / u) if u > 0 else None for i, u in zip(inter, union, strict=True)]
    vals = [v for v in iou if v is not None]
    return float(np.mean(vals)), iou


def predict(model: nn.Module, images: np.ndarray, tta: bool, bs: int = 64) -> torch.Tensor:
    """Labels (n,H,W) = argmax over classes 1..4 of the softmax (averaged with the h-flip view)."""
    model.eval()
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(images), bs):
            x = torch.from_numpy(images[s:s + bs]).float()[:, None].contiguous(memory_format=torch.channels_last)
            p = model(x).float().softmax(1)
            if tta:
                p = 0.5 * (p + model(x.flip(3)).float().softmax(1).flip(3))
            out.append(p[:, 1:].argmax(1) + 1)
    return torch.cat(out)


# --- the loop -------------------------------------------------------------------------------


def train(data: Path, splits: Path, fold: int, epochs: int, seed: int, threads: int,
          base: int = 16, bs: int = 32, lr: float = 1e-3, log=print) -> dict:
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    tr = read_split(data, "train")
    spec = json.loads(Path(splits).read_text())["folds"][fold]
    pos = {int(i): p for p, i in enumerate(tr["ids"])}
    val_rows = np.array(sorted(pos[int(i)] for i in spec["val_ids"]))
    train_rows = np.array(sorted(pos[int(i)] for i in spec["train_ids"]))
    bg = (tr["masks"][train_rows] == 0).mean(axis=(1, 2))
    keep = bg <= 0.8
    if "outlier" in tr:
        keep &= ~tr["outlier"][train_rows].astype(bool)
    train_rows = train_rows[keep]
    xs = torch.from_numpy(tr["images"][train_rows])
    ys = torch.from_numpy(tr["masks"][train_rows]).long()
    val_x, val_y = tr["images"][val_rows], torch.from_numpy(tr["masks"][val_rows])
    has_rock = (ys == 4).flatten(1).any(1)
    rock_x, rock_m = xs[has_rock], ys[has_rock] == 4

    freq = torch.bincount(ys.reshape(-1), minlength=NUM_CLASSES).double()[1:]
    w = 1.0 / torch.sqrt(freq / freq.sum())
    weight = torch.cat([torch.zeros(1), (w / w.mean()).float()])

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = UNet(base).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(train_rows) // bs
    total = epochs * steps_per_epoch
    step, best, best_state, history = 0, -1.0, None, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(train_rows), generator=g)
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            x, y = augment(xs[idx][:, None].float(), ys[idx], rock_x, rock_m, g)
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), y, weight=weight, ignore_index=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
        train_s = time.perf_counter() - t0
        miou, iou = course_scores(confusion(predict(model, val_x, tta=False), val_y))
        history.append({"epoch": epoch, "loss": loss_sum / steps_per_epoch, "val_miou": miou,
                        "img_s": steps_per_epoch * bs / train_s, "seconds": time.perf_counter() - t0})
        log(f"plain fold {fold} epoch {epoch}: loss {loss_sum / steps_per_epoch:.4f} "
            f"val mIoU {100 * miou:.2f} ({history[-1]['img_s']:.1f} img/s)")
        if miou > best:
            best = miou
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch, best_iou = epoch, iou
    model.load_state_dict(best_state)
    result = {"fold": fold, "epochs": epochs, "seed": seed, "threads": threads,
              "n_train": int(len(train_rows)), "n_val": int(len(val_rows)),
              "best_epoch": best_epoch, "val_miou": best, "val_iou": best_iou,
              "train_img_s": float(np.median([h["img_s"] for h in history])),
              "history": history}
    te = read_split(data, "test")
    if "masks" in te:
        gold_y = torch.from_numpy(te["masks"])
        for tta in (False, True):
            miou, iou = course_scores(confusion(predict(model, te["images"], tta=tta), gold_y))
            key = "gold_tta" if tta else "gold"
            result[key], result[key + "_iou"] = miou, iou
    result["wall_s"] = time.perf_counter() - t_start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.plain_loop", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared shard folder")
    ap.add_argument("--splits", type=Path, required=True, help="a run folder's splits.json")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True, help="folder for plain.json")
    a = ap.parse_args()
    res = train(a.data, a.splits, a.fold, a.epochs, a.seed, a.threads, base=a.base_width)
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / f".plain.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, a.out / "plain.json")
    print(json.dumps({k: v for k, v in res.items() if k != "history"}))


if __name__ == "__main__":
    main()
