"""train_one_fold: one (member, fold) of a recipe, the accelerate loop written out.

Writes ``<out>/<member>/fold_<k>/``:
  model.safetensors + config.json  best weights by validation course mIoU (save_pretrained)
  metrics.jsonl                    one JSON line per finished epoch
  state/                           accelerate.save_state of the last finished epoch + trainer.json
  oof.h5                           ids i64 (n,), probs f16 (n,5,64,128): softmax of the best
                                   weights on the validation fold (out-of-fold predictions)
  done.json                        written last; its presence means the fold is finished

Resuming: a fold folder with ``state/`` continues after its last finished epoch.
Every epoch's randomness (shuffle order, augmentation, dropout) is seeded from
(recipe seed, member, fold, epoch), so a resumed fold retraces exactly the
epochs an uninterrupted one would have run, and the same seed gives the same
weights on CPU.

Filters (background fraction, outliers) apply to the TRAINING part of a fold
only: the validation part keeps every labeled image of the fold, so scores of
recipes with different filters stay comparable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import IMAGE_SHAPE, NUM_CLASSES
from ._io import sha256_file, write_json_atomic
from .config import MemberConfig, Recipe, ScheduleConfig, check_precision
from .errors import InputError

STATE_DIR = "state"
TRAINER_STATE = "trainer.json"
DONE = "done.json"
METRICS = "metrics.jsonl"
OOF = "oof.h5"

Progress = Callable[[dict], None]


# --- small pure helpers ---------------------------------------------------------------------


def lr_at(schedule: ScheduleConfig, base_lr: float, step: int, steps_per_epoch: int,
          epochs: int, plateau_scale: float = 1.0) -> float:
    """Learning rate for optimizer step `step` (0-based) under `schedule`.

    Linear warmup over `warmup_epochs`, then constant / cosine to
    `min_lr_ratio * base_lr` at the last step / x`gamma` every `step_epochs` /
    `plateau_scale` (decayed by the loop when validation stalls).
    """
    warm = schedule.warmup_epochs * steps_per_epoch
    if step < warm:
        return base_lr * (step + 1) / warm
    if schedule.name == "cosine":
        total = max(1, epochs * steps_per_epoch - warm)
        t = min(1.0, (step - warm) / total)
        lo = schedule.min_lr_ratio * base_lr
        return lo + (base_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule.name == "step":
        return base_lr * schedule.gamma ** ((step // steps_per_epoch) // schedule.step_epochs)
    if schedule.name == "plateau":
        return base_lr * plateau_scale
    return base_lr


def fold_seed(seed: int, member: str, fold: int, epoch: int = -1) -> int:
    """A stable 31-bit seed per (recipe seed, member, fold, epoch); -1 = initialisation."""
    key = f"{seed}/{member}/{fold}/{epoch}".encode()
    return zlib.crc32(key) & 0x7FFFFFFF


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CPU and on GPUs with bf16, else fp16. fp16 on CPU is an InputError."""
    check_precision(precision, gpus=1 if device.type == "cuda" else 0)
    if precision == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return "fp16"
        return "bf16"
    return precision


def _nan_to_none(values) -> list:
    return [None if (v is None or not math.isfinite(v)) else round(float(v), 6) for v in values]


def _score(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 6)


# --- splits and data --------------------------------------------------------------------------


def _load_train(data) -> object:
    """`data` is a shard folder (Path/str) or an already loaded train `Split`."""
    if hasattr(data, "images") and hasattr(data, "ids"):
        return data
    from .data import load_split

    split = load_split(Path(data), "train")
    if split.masks is None:
        raise InputError(f"{data}: the train split has no masks; cannot train")
    if len(split) == 0:
        raise InputError(f"{data}: the train split is empty")
    return split


def ensure_splits(recipe: Recipe, split, out: Path) -> dict:
    """Read `<out>/splits.json`, or make it once (grouped, big-rock stratified) and write it.

    The split seed is the recipe's `split_seed`, else its `seed`. An existing file must
    match the recipe's k and split seed and the data's ids.
    """
    from .folds import load_splits, make_splits, save_splits

    out = Path(out)
    path = out / "splits.json"
    seed = recipe.seed if recipe.split_seed is None else recipe.split_seed
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        big_rock = (split.masks == 4).any(axis=(1, 2))
        folds = make_splits(list(split.groups), list(big_rock), recipe.folds, seed)
        tmp = out / f"splits.json.tmp-{os.getpid()}"
        save_splits(tmp, folds, split.ids, recipe.folds, seed)
        os.replace(tmp, path)
    splits = load_splits(path)
    if splits["k"] != recipe.folds or splits["seed"] != seed:
        raise InputError(f"{path}: made with k={splits['k']} seed={splits['seed']} but the recipe "
                         f"asks for k={recipe.folds} seed={seed}; use a new --out")
    ids = set(int(i) for f in splits["folds"] for i in f["val_ids"])
    if ids != set(int(i) for i in split.ids):
        raise InputError(f"{path}: its ids do not match the train split of the data; use a new --out")
    return splits


def fold_rows(split, splits: dict, fold: int, member: MemberConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Positions (train, val) into `split` for `fold`; the member's filters drop training rows only.

    Returns (train_rows, val_rows sorted by id, number of training rows filtered out).
    """
    if not 0 <= fold < splits["k"]:
        raise InputError(f"fold {fold} is out of range for k={splits['k']}")
    pos = {int(i): p for p, i in enumerate(split.ids)}
    val = np.array(sorted(pos[int(i)] for i in splits["folds"][fold]["val_ids"]), dtype=np.int64)
    is_val = np.zeros(len(split.ids), bool)
    is_val[val] = True
    keep = ~is_val
    n_before = int(keep.sum())
    f = member.filters
    if f.max_background < 1.0 and split.bg_fraction is not None:
        keep &= split.bg_fraction <= f.max_background
    if f.skip_outliers:
        keep &= ~np.asarray(split.outlier, bool)
    train = np.flatnonzero(keep)
    if len(train) == 0:
        raise InputError(f"member {member.name!r} fold {fold}: the filters leave no training images")
    return train, val, n_before - len(train)


class InMemory(Dataset):
    """uint8 images/masks (n,64,128) held in memory; `__getitems__` slices a whole batch at once."""

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.masks = torch.from_numpy(np.ascontiguousarray(masks))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]

    def __getitems__(self, idx: list[int]):
        idx = torch.as_tensor(idx)
        return self.images[idx], self.masks[idx]


def _whole_batch(batch):
    return batch  # InMemory.__getitems__ already returns (images, masks) batches


# --- the loop ---------------------------------------------------------------------------------


def _make_accelerator(precision: str, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # One process may train several folds (--sequential, tests); accelerate keeps a
    # process-wide singleton that refuses a second Accelerator with other settings.
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=cpu)


def _make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    # decay_norms = false: no weight decay on norms and biases (1-d tensors), as is common
    # for conv nets; true: decay on every parameter (plain torch.optim with weight_decay).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1 or cfg.decay_norms]
    no_decay = [p for p in params if p.ndim <= 1 and not cfg.decay_norms]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W) on device -> float (B,1,H,W) 0..255, channels_last (the model normalises)."""
    return images.unsqueeze(1).float().contiguous(memory_format=torch.channels_last)


def labeled_argmax(scores):
    """Argmax over classes 1..4 of (B,5,H,W) logits or probabilities (torch or numpy).

    Class 0 is "unlabeled": predicting it can only lower the course score, so
    validation, out-of-fold scores and submissions all use this argmax.
    """
    return scores[:, 1:].argmax(1) + 1


def evaluate(model, loader, accelerator, probs_out: np.ndarray | None = None) -> np.ndarray:
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
            logits = model(_to_model_input(images))
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


def _save_state(accelerator, fold_dir: Path, trainer: dict) -> None:
    """accelerate.save_state into a temp folder + trainer.json, then swap it in as state/."""
    state = fold_dir / STATE_DIR
    tmp = fold_dir / f"{STATE_DIR}.tmp-{os.getpid()}"
    old = fold_dir / f"{STATE_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if state.exists():
        os.replace(state, old)
    os.replace(tmp, state)
    shutil.rmtree(old, ignore_errors=True)


def _find_state(fold_dir: Path) -> Path | None:
    """The last complete state folder (state/, or state.old/ if a swap was interrupted)."""
    for p in fold_dir.glob(f"{STATE_DIR}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        p = fold_dir / name
        if (p / TRAINER_STATE).is_file():
            if name != STATE_DIR:
                os.replace(p, fold_dir / STATE_DIR)
                p = fold_dir / STATE_DIR
            return p
    return None


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a killed writer
    return rows


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the metrics of epochs <= last_epoch (those the saved state includes)."""
    rows = [r for r in _read_metrics(path) if r.get("epoch", 1 << 30) <= last_epoch]
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_oof(path: Path, ids: np.ndarray, probs: np.ndarray) -> None:
    import h5py

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=ids.astype(np.int64))
        # Uncompressed: softmax f16 barely compresses (lzf saved ~4%) and costs time.
        f.create_dataset("probs", data=probs, chunks=(1, NUM_CLASSES, *IMAGE_SHAPE))
        f.attrs["format_version"] = 1
    os.replace(tmp, path)


def predict_oof(fold_dir: Path, images: np.ndarray, accelerator, batch_size: int) -> np.ndarray:
    """Softmax (n,5,H,W) f16 of the saved best weights, reloaded with load_pretrained."""
    from .models.registry import load_pretrained

    model = load_pretrained(fold_dir, map_location=accelerator.device)
    model = model.to(memory_format=torch.channels_last)
    out = np.empty((len(images), NUM_CLASSES, *IMAGE_SHAPE), np.float16)
    with torch.no_grad(), accelerator.autocast():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(images[s:s + batch_size]).to(accelerator.device)
            p = torch.softmax(model(_to_model_input(x)).float(), dim=1)
            out[s:s + len(x)] = p.half().cpu().numpy()
    return out


def train_one_fold(recipe: Recipe, member: str | MemberConfig, fold: int, data, out,
                   *, precision: str = "auto", threads: int | None = None,
                   progress: Progress | None = None) -> dict:
    """Train `member` of `recipe` on fold `fold` of `data` into `<out>/<member>/fold_<fold>/`.

    data: shard folder (or a loaded train Split). precision: auto | bf16 | fp16 | no
    (fp16 is GPU-only). threads: torch CPU threads for this fold. progress: called
    with small dicts ("start", "batch", "epoch", "done" events) for live display.
    Returns the done.json dict. A finished fold (done.json present) returns at once;
    an interrupted one resumes after its last saved epoch.
    """
    t_start = time.perf_counter()
    m = recipe.member(member) if isinstance(member, str) else member
    out = Path(out)
    fold_dir = out / m.name / f"fold_{fold}"
    done_path = fold_dir / DONE
    if done_path.is_file():
        return json.loads(done_path.read_text())
    if threads:
        torch.set_num_threads(int(threads))
    use_cuda = torch.cuda.is_available()
    prec = resolve_precision(precision, torch.device("cuda" if use_cuda else "cpu"))

    from .augment import RockBank, RockImages, augment_batch
    from .losses import CombinedLoss, class_weights
    from .metrics import class_iou, course_miou
    from .models.registry import build_model, save_pretrained

    split = _load_train(data)
    splits = ensure_splits(recipe, split, out)
    train_rows, val_rows, n_filtered = fold_rows(split, splits, fold, m)
    fold_dir.mkdir(parents=True, exist_ok=True)

    def report(event: str, **kw) -> None:
        if progress is not None:
            progress({"event": event, "member": m.name, "fold": fold, "epochs": m.epochs,
                      "pid": os.getpid(), "time": time.time(), **kw})

    accelerator = _make_accelerator(prec, cpu=not use_cuda)
    device = accelerator.device

    torch.manual_seed(fold_seed(recipe.seed, m.name, fold))
    model = build_model(m.model.name, **m.model.args).to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(m.optimizer, model)

    tr_images, tr_masks = split.images[train_rows], split.masks[train_rows]
    shuffle_gen = torch.Generator()
    bs = m.batch_size
    drop_last = len(train_rows) > bs  # no 1-image BatchNorm batches, but never an empty epoch
    train_dl = DataLoader(InMemory(tr_images, tr_masks), batch_size=bs, shuffle=True,
                          generator=shuffle_gen, drop_last=drop_last, collate_fn=_whole_batch)
    val_dl = DataLoader(InMemory(split.images[val_rows], split.masks[val_rows]),
                        batch_size=2 * bs, shuffle=False, collate_fn=_whole_batch)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)

    counts = np.bincount(tr_masks.reshape(-1), minlength=NUM_CLASSES)[:NUM_CLASSES]
    weight = None
    if m.loss.class_weights != "none":
        weight = class_weights(counts.tolist(), m.loss.class_weights, beta=m.loss.beta,
                               ignore_background=m.loss.ignore_background)
    loss_fn = CombinedLoss(m.loss.terms, weight=weight, ignore_background=m.loss.ignore_background,
                           focal_gamma=m.loss.focal_gamma).to(device)
    a = m.augment
    bank = RockBank.from_arrays(tr_images, tr_masks) if a.rock_target > 0 else None
    rocks = RockImages.from_arrays(tr_images, tr_masks, device) if a.rock_paste > 0 else None
    aug_gen = torch.Generator(device=device)

    steps_per_epoch = len(train_dl)
    trainer = {"epoch": -1, "best_miou": None, "best_epoch": -1, "bad_epochs": 0,
               "plateau_bad": 0, "plateau_scale": 1.0, "step": 0, "train_seconds": 0.0,
               "stopped_early": False}
    metrics_path = fold_dir / METRICS
    resumed_from = None
    state_dir = _find_state(fold_dir)
    if state_dir is not None:
        accelerator.load_state(str(state_dir))
        trainer.update(json.loads((state_dir / TRAINER_STATE).read_text()))
        resumed_from = trainer["epoch"]
        _truncate_metrics(metrics_path, trainer["epoch"])
    elif metrics_path.exists():
        metrics_path.unlink()  # metrics from a run that never saved a state
    report("start", epoch=trainer["epoch"] + 1, resumed_from=resumed_from,
           n_train=len(train_rows), n_val=len(val_rows), precision=prec, device=str(device))

    base_lr = m.optimizer.lr
    # Softmax of the validation fold from the current epoch / from the best epoch so far.
    epoch_probs = np.empty((len(val_rows), NUM_CLASSES, *IMAGE_SHAPE), np.float16)
    best_probs = None
    last_report = time.perf_counter()
    for epoch in range(trainer["epoch"] + 1, m.epochs):
        if trainer["stopped_early"]:
            break
        t_epoch = time.perf_counter()
        seed = fold_seed(recipe.seed, m.name, fold, epoch)
        shuffle_gen.manual_seed(seed)
        aug_gen.manual_seed(seed)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global RNG
        model.train()
        loss_sum = torch.zeros((), device=device)
        n_img = 0
        lr = base_lr
        for i, (images, masks) in enumerate(train_dl):
            lr = lr_at(m.schedule, base_lr, trainer["step"], steps_per_epoch, m.epochs,
                       trainer["plateau_scale"])
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = augment_batch(images.unsqueeze(1).float(), masks.long(), generator=aug_gen,
                                 hflip_p=a.hflip, vflip_p=a.vflip, cutmix_p=a.cutmix,
                                 cutmix_mode=a.cutmix_mode, rock_images=rocks,
                                 rock_paste_p=a.rock_paste, rock_bank=bank, rock_target=a.rock_target,
                                 brightness=a.brightness, contrast=a.contrast)
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = loss_fn(logits, y)
            accelerator.backward(loss)
            if m.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), m.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(y)
            n_img += len(y)
            trainer["step"] += 1
            if progress is not None and time.perf_counter() - last_report > 2.0:
                last_report = time.perf_counter()
                report("batch", epoch=epoch, batch=i + 1, batches=steps_per_epoch,
                       img_s=n_img / (last_report - t_epoch))
        train_s = time.perf_counter() - t_epoch
        trainer["train_seconds"] += train_s
        mean_loss = float(loss_sum.item()) / max(n_img, 1)
        if not math.isfinite(mean_loss):
            raise InputError(f"member {m.name!r} fold {fold}: loss became {mean_loss} at epoch "
                             f"{epoch}; lower optimizer.lr or use precision 'no'")

        cm = evaluate(model, val_dl, accelerator, probs_out=epoch_probs)
        miou, iou = course_miou(cm), class_iou(cm)
        score = miou if math.isfinite(miou) else -1.0
        best = trainer["best_miou"]
        if best is None or score > best:
            trainer.update(best_miou=score, best_epoch=epoch, bad_epochs=0, plateau_bad=0)
            spare = best_probs if best_probs is not None else np.empty_like(epoch_probs)
            best_probs, epoch_probs = epoch_probs, spare
            save_pretrained(accelerator.unwrap_model(model), fold_dir,
                            extra={"member": m.name, "fold": fold, "recipe": recipe.name,
                                   "epoch": epoch, "val_miou": _score(miou),
                                   "val_iou": _nan_to_none(iou)})
        else:
            trainer["bad_epochs"] += 1
            trainer["plateau_bad"] += 1
            if m.schedule.name == "plateau" and trainer["plateau_bad"] >= m.schedule.plateau_patience:
                trainer["plateau_scale"] *= m.schedule.gamma
                trainer["plateau_bad"] = 0
            if m.patience and trainer["bad_epochs"] >= m.patience:
                trainer["stopped_early"] = True
        seconds = time.perf_counter() - t_epoch
        row = {"epoch": epoch, "loss": round(mean_loss, 6), "val_miou": _score(miou),
               "val_iou": _nan_to_none(iou), "lr": lr, "img_s": round(n_img / train_s, 2),
               "seconds": round(seconds, 3),
               "worker": {"host": socket.gethostname(), "pid": os.getpid()}}
        if resumed_from is not None and epoch == resumed_from + 1:
            row["resumed"] = True
        _append_metrics(metrics_path, row)
        trainer["epoch"] = epoch
        _save_state(accelerator, fold_dir, trainer)
        report("epoch", epoch=epoch, loss=row["loss"], val_miou=row["val_miou"],
               best_miou=trainer["best_miou"], img_s=row["img_s"], seconds=row["seconds"])

    if best_probs is None:  # the best epoch was trained by an earlier attempt: recompute
        best_probs = predict_oof(fold_dir, split.images[val_rows], accelerator, 2 * bs)
    _write_oof(fold_dir / OOF, split.ids[val_rows], best_probs)
    rows = _read_metrics(metrics_path)
    best_row = next((r for r in rows if r["epoch"] == trainer["best_epoch"]), {})
    done = {"member": m.name, "fold": fold, "recipe": recipe.name,
            "best_epoch": trainer["best_epoch"], "val_miou": best_row.get("val_miou"),
            "val_iou": best_row.get("val_iou"), "epochs_run": trainer["epoch"] + 1,
            "stopped_early": trainer["stopped_early"], "n_train": int(len(train_rows)),
            "n_train_filtered": int(n_filtered), "n_val": int(len(val_rows)),
            "precision": prec, "device": str(device),
            "train_seconds": round(trainer["train_seconds"], 3),
            "sha256": sha256_file(fold_dir / "model.safetensors"),
            "seconds_this_attempt": round(time.perf_counter() - t_start, 3)}
    write_json_atomic(done_path, done)
    report("done", epoch=trainer["epoch"], val_miou=done["val_miou"])
    return done
