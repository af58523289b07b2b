"""train_one_fold: one (member, fold) of a recipe, the accelerate loop written out.

Writes a fold folder of the run folder (names and readers: `runfolder`):
  weights + config                 best weights by validation course mIoU (save_pretrained)
  metrics                          one JSON line per finished epoch
  state/                           accelerate.save_state of the last finished epoch + trainer.json
  out-of-fold file                 ids i64 (n,), probs f16 (n,5,64,128): softmax of the best
                                   weights on the validation fold (out-of-fold predictions)
  budget.json                      with a time budget: the epoch count decided before epoch 0
  done                             written last (with the weights' sha256): the fold is finished

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

import math
import os
import socket
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import IMAGE_SHAPE, NUM_CLASSES
from ._io import atomic_path, sha256_file
from .config import MemberConfig, Recipe, ScheduleConfig
from .device import resolve_precision
from .errors import InputError
from .metrics import labeled_argmax, round_score
from .runfolder import (
    METRICS,
    OOF,
    STATE,
    WEIGHTS,
    RunFolder,
    append_metrics,
    find_state,
    read_metrics,
    read_trainer,
    truncate_metrics,
    write_oof,
    write_trainer,
)

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


def plan_splits(recipe: Recipe, split, run: RunFolder) -> tuple[dict, bool]:
    """The run's splits (read, or made now: grouped, big-rock stratified) and whether they are new.

    The split seed is the recipe's `split_seed`, else its `seed`. Existing splits must
    match the recipe's k and split seed and the data's ids. Writes nothing.
    """
    from .folds import make_splits, splits_dict

    seed = recipe.seed if recipe.split_seed is None else recipe.split_seed
    splits = run.read_splits()
    if splits is None:
        folds = make_splits(list(split.groups), list(split.big_rock), recipe.folds, seed)
        return splits_dict(folds, split.ids, recipe.folds, seed), True
    if splits["k"] != recipe.folds or splits["seed"] != seed:
        raise InputError(f"{run.splits}: made with k={splits['k']} seed={splits['seed']} but the "
                         f"recipe asks for k={recipe.folds} seed={seed}; use a new --out")
    ids = set(int(i) for f in splits["folds"] for i in f["val_ids"])
    if ids != set(int(i) for i in split.ids):
        raise InputError(f"{run.splits}: its ids do not match the train split of the data; "
                         "use a new --out")
    return splits, False


def ensure_splits(recipe: Recipe, split, out: Path) -> dict:
    """`plan_splits`, writing new splits into the run folder `out` (created)."""
    run = RunFolder(out)
    splits, new = plan_splits(recipe, split, run)
    if new:
        run.write_splits(splits)
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


def validate(model, loader, accelerator, probs_out: np.ndarray | None = None) -> np.ndarray:
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
    """accelerate.save_state + trainer.json into a temp folder, then swapped in as state/."""
    with atomic_path(fold_dir / STATE) as tmp:
        accelerator.save_state(str(tmp))
        write_trainer(tmp, trainer)


def _load_state(accelerator, state: Path, trainer: dict) -> None:
    trainer.update(read_trainer(state))
    try:
        accelerator.load_state(str(state))
    except Exception as e:  # noqa: BLE001 - a corrupt state must not surface as a traceback
        raise InputError(f"{state}: cannot resume from the saved training state "
                         f"({type(e).__name__}); delete it to train the fold from epoch 0") from None


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


def _budget_epochs(fold_dir: Path, time_budget: float | None, has_state: bool, model, optimizer,
                   accelerator, train_step, images: np.ndarray, masks: np.ndarray,
                   val_images: np.ndarray, val_rows: np.ndarray, bs: int,
                   steps_per_epoch: int) -> int | None:
    """The fold's epochs under --time-budget (measured once, kept in budget.json); None without.

    The probe times `train_step` on the first training batch and the validation forward
    on one validation batch; `budget.probe` puts model and optimizer back afterwards.
    """
    from . import budget

    def measure() -> dict:
        dev = accelerator.device
        x, y = torch.from_numpy(images[:bs]).to(dev), torch.from_numpy(masks[:bs]).to(dev)
        xv = torch.from_numpy(val_images[val_rows[:2 * bs]]).to(dev)
        lr = optimizer.param_groups[0]["lr"]

        def val_step() -> None:
            model.eval()
            with torch.no_grad():
                labeled_argmax(model(_to_model_input(xv)))

        return budget.probe(model, optimizer, accelerator, train_step=lambda: train_step(x, y, lr),
                            val_step=val_step, n_val_batches=len(val_rows) / max(1, len(xv)),
                            scratch=fold_dir / "budget-probe.tmp")

    return budget.decide_epochs(fold_dir, time_budget, has_state=has_state, measure=measure,
                                steps_per_epoch=steps_per_epoch)


def _poll_threads(threads_fn: Callable[[], int] | None) -> None:
    """Apply the thread count `threads_fn` asks for now (e.g. a share of idle cores)."""
    n = threads_fn() if threads_fn is not None else None
    if n and n != torch.get_num_threads():
        torch.set_num_threads(int(n))


def train_one_fold(recipe: Recipe, member: str | MemberConfig, fold: int, data, out,
                   *, precision: str = "auto", threads: int | None = None,
                   progress: Progress | None = None, time_budget: float | None = None,
                   threads_fn: Callable[[], int] | None = None, compile: bool = False) -> dict:
    """Train `member` of `recipe` on fold `fold` of `data` into its fold folder of run folder `out`.

    data: shard folder (or a loaded train Split). precision: auto | bf16 | fp16 | no
    (fp16 is GPU-only). threads: torch CPU threads for this fold. progress: called
    with small dicts ("start", "batch", "epoch", "done" events) for live display.
    time_budget: wall seconds for this fold's epochs; replaces the member's epochs by a
    count measured once and kept in budget.json (see `budget`). threads_fn: asked at
    every epoch start for the torch thread count (e.g. more when other folds finished).
    compile: torch.compile the model's forward (nn.Module.compile: state dicts unchanged).
    Returns the done dict. A finished fold returns it at once (its weights checked);
    an interrupted one resumes after its last saved epoch.
    """
    t_start = time.perf_counter()
    m = recipe.member(member) if isinstance(member, str) else member
    run = RunFolder(out)
    fold_dir = run.fold_dir(m.name, fold)
    done = run.verify_fold(m.name, fold)
    if done is not None:
        return done
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
    if compile:
        model.compile()  # in place: parameter names, state dicts and saved weights stay the same
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
    state_dir = find_state(fold_dir)
    if state_dir is not None:
        _load_state(accelerator, state_dir, trainer)
        resumed_from = trainer["epoch"]
        truncate_metrics(metrics_path, trainer["epoch"])
    elif metrics_path.exists():
        metrics_path.unlink()  # metrics from a run that never saved a state

    def train_step(images, masks, lr: float) -> tuple[torch.Tensor, int]:
        """One optimizer step on a batch at `lr`; returns (detached loss, batch size)."""
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
        return loss.detach(), len(y)

    budget_epochs = _budget_epochs(fold_dir, time_budget, state_dir is not None, model, optimizer,
                                   accelerator, train_step, tr_images, tr_masks, split.images,
                                   val_rows, bs, steps_per_epoch)
    if budget_epochs is not None:
        from .budget import fit_member

        m = fit_member(m, budget_epochs)
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
        _poll_threads(threads_fn)
        model.train()
        loss_sum = torch.zeros((), device=device)
        n_img = 0
        lr = base_lr
        for i, (images, masks) in enumerate(train_dl):
            lr = lr_at(m.schedule, base_lr, trainer["step"], steps_per_epoch, m.epochs,
                       trainer["plateau_scale"])
            loss, n = train_step(images, masks, lr)
            loss_sum += loss * n
            n_img += n
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

        cm = validate(model, val_dl, accelerator, probs_out=epoch_probs)
        miou, iou = course_miou(cm), class_iou(cm)
        score = miou if math.isfinite(miou) else -1.0
        best = trainer["best_miou"]
        if best is None or score > best:
            trainer.update(best_miou=score, best_epoch=epoch, bad_epochs=0, plateau_bad=0)
            spare = best_probs if best_probs is not None else np.empty_like(epoch_probs)
            best_probs, epoch_probs = epoch_probs, spare
            save_pretrained(accelerator.unwrap_model(model), fold_dir,
                            extra={"member": m.name, "fold": fold, "recipe": recipe.name,
                                   "epoch": epoch, "val_miou": round_score(miou),
                                   "val_iou": [round_score(v) for v in iou]})
        else:
            trainer["bad_epochs"] += 1
            trainer["plateau_bad"] += 1
            if m.schedule.name == "plateau" and trainer["plateau_bad"] >= m.schedule.plateau_patience:
                trainer["plateau_scale"] *= m.schedule.gamma
                trainer["plateau_bad"] = 0
            if m.patience and trainer["bad_epochs"] >= m.patience:
                trainer["stopped_early"] = True
        seconds = time.perf_counter() - t_epoch
        row = {"epoch": epoch, "loss": round(mean_loss, 6), "val_miou": round_score(miou),
               "val_iou": [round_score(v) for v in iou], "lr": lr, "img_s": round(n_img / train_s, 2),
               "seconds": round(seconds, 3), "threads": torch.get_num_threads(),
               "worker": {"host": socket.gethostname(), "pid": os.getpid()}}
        if resumed_from is not None and epoch == resumed_from + 1:
            row["resumed"] = True
        append_metrics(metrics_path, row)
        trainer["epoch"] = epoch
        _save_state(accelerator, fold_dir, trainer)
        report("epoch", epoch=epoch, loss=row["loss"], val_miou=row["val_miou"],
               best_miou=trainer["best_miou"], img_s=row["img_s"], seconds=row["seconds"])

    if best_probs is None:  # the best epoch was trained by an earlier attempt: recompute
        best_probs = predict_oof(fold_dir, split.images[val_rows], accelerator, 2 * bs)
    write_oof(fold_dir / OOF, split.ids[val_rows], best_probs)
    rows = read_metrics(metrics_path)
    best_row = next((r for r in rows if r["epoch"] == trainer["best_epoch"]), {})
    done = {"member": m.name, "fold": fold, "recipe": recipe.name,
            "best_epoch": trainer["best_epoch"], "val_miou": best_row.get("val_miou"),
            "val_iou": best_row.get("val_iou"), "epochs": m.epochs, "epochs_run": trainer["epoch"] + 1,
            "stopped_early": trainer["stopped_early"], "n_train": int(len(train_rows)),
            "n_train_filtered": int(n_filtered), "n_val": int(len(val_rows)),
            "precision": prec, "device": str(device),
            "train_seconds": round(trainer["train_seconds"], 3),
            "sha256": sha256_file(fold_dir / WEIGHTS),
            "seconds_this_attempt": round(time.perf_counter() - t_start, 3)}
    run.write_done(m.name, fold, done)
    report("done", epoch=trainer["epoch"], val_miou=done["val_miou"])
    return done
