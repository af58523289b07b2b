"""train_one_fold: one (member, fold) of a recipe, the accelerate loop written out.

Writes a fold folder of the run folder (names and readers: `runfolder`):
  weights + config                 best weights by validation course mIoU (save_pretrained)
  metrics                          one JSON line per finished epoch
  state/                           accelerate.save_state of the last finished epoch + trainer.json
  out-of-fold file                 ids i64 (n,), probs f16 (n,5,64,128): softmax of the best
                                   weights on the validation fold (out-of-fold predictions)
  budget.json                      with a time budget: the epoch count decided before epoch 0
  done                             written last (with the weights' sha256): the fold is finished

The loop reads as its phases: `_set_up` (splits, accelerator, model, loaders), `checkpoint.resume`
(saved `TrainerState`), `_fit_time_budget`, then per epoch `_seed_epoch`, `_train_epoch`,
`_validate_epoch`, the metrics row and the saved state, and `_finish` (out-of-fold file, done).

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

import dataclasses
import math
import os
import socket
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import IMAGE_SHAPE, NUM_CLASSES
from ._io import sha256_file
from ._progress import Event, Report
from .augment import RockBank, RockImages
from .checkpoint import TrainerState, resume, save_state
from .config import MemberConfig, Recipe
from .data import Split
from .data.loaders import make_loaders
from .data.sampling import RareClassSampler, holds_class
from .dataparallel import check_batch, rank_seed, sync_batchnorm, world
from .device import Resolved, make_accelerator, resolve
from .errors import InputError
from .folds import ensure_splits, fold_rows, load_train
from .losses import make_loss
from .metrics import labeled_argmax, round_score
from .models.registry import to_model_input
from .optim import lr_at, make_optimizer
from .records import Done
from .runfolder import METRICS, OOF, WEIGHTS, RunFolder, append_metrics, read_metrics, write_oof
from .teaching import TARGETS, Taught, Teaching, with_pseudo_labels
from .tracking import TrackingSpec, fold_run
from .validation import predict_oof, validate

if TYPE_CHECKING:
    from accelerate import Accelerator

Progress = Callable[[Event], None]


# --- small pure helpers -----------------------------------------------------------------------


def poll_threads(threads_fn: Callable[[], int] | None) -> None:
    """Apply the thread count `threads_fn` asks for now (e.g. a share of idle cores)."""
    n = threads_fn() if threads_fn is not None else None
    if n and n != torch.get_num_threads():
        torch.set_num_threads(int(n))


def fold_seed(seed: int, member: str, fold: int, epoch: int = -1) -> int:
    """A stable 31-bit seed per (recipe seed, member, fold, epoch); -1 = initialisation."""
    key = f"{seed}/{member}/{fold}/{epoch}".encode()
    return zlib.crc32(key) & 0x7FFFFFFF


# --- the loop's state and phases --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FoldSetup:
    """What `train_one_fold` builds before epoch 0 (plain data, no behaviour)."""

    recipe: Recipe
    member: MemberConfig  # its epochs replaced once by --time-budget, before epoch 0
    fold: int | str  # a fold number or "all"
    fold_dir: Path
    split: Split  # the train split
    train_rows: np.ndarray
    val_rows: np.ndarray
    n_filtered: int  # training rows the member's filters dropped
    precision: str
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_dl: DataLoader
    val_dl: DataLoader
    loss_fn: torch.nn.Module
    shuffle_gen: torch.Generator
    aug_gen: torch.Generator
    rock_bank: RockBank | None
    rock_images: RockImages | None
    taught: Taught | None = None  # the teacher's targets of a taught fold (distill)
    n_pseudo: int = 0  # pseudo-labelled unlabeled images in the training part (--teacher)
    sampler: RareClassSampler | None = None  # [members.sampling] with factor != 1


def _sampler(m: MemberConfig, masks: np.ndarray, gen: torch.Generator,
             taught: bool) -> RareClassSampler | None:
    """The member's rare-class sampler over the training part's masks (None: a shuffle)."""
    s = m.sampling
    if s.factor == 1.0:
        return None
    if taught:
        raise InputError(f"member {m.name!r}: [members.sampling] does not apply to a taught "
                         "(distill) fold, whose loader streams the teacher's targets; "
                         "remove it or set factor = 1.0")
    return RareClassSampler(holds_class(masks, s.rare_class, s.min_pixels), s.factor, gen)


def _set_up(recipe: Recipe, m: MemberConfig, fold: int | str, data, out, rt: Resolved,
            splits: dict | None, compile: bool, teaching: Teaching | None, pseudo: bool,
            log_with=None) -> FoldSetup:
    """Splits, accelerator (with `log_with`'s trackers), model (seeded), optimizer, loaders, loss
    and rock sources of a fold (with `teaching`: the training loader streams the teacher's
    targets too; with `pseudo` the training part gets the run's pseudo-labelled test images,
    labelled by the teacher's models of this fold)."""
    from .models.registry import build_model

    prec = rt.precision
    split = load_train(data)
    splits = splits if splits is not None else ensure_splits(recipe, split, out)
    train_rows, val_rows, n_filtered = fold_rows(split, splits, fold, m)
    fold_dir = RunFolder(out).fold_dir(m.name, fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    use_cuda = rt.device.type == "cuda"
    workers = world()[1]  # > 1: one of the data-parallel processes of this fold
    check_batch(m.batch_size, workers, m.name)
    accelerator = make_accelerator(prec, cpu=not use_cuda, split_batches=workers > 1,
                                   log_with=log_with, project_dir=out)
    device = accelerator.device

    torch.manual_seed(fold_seed(recipe.seed, m.name, fold))
    model = build_model(m.model.name, **m.model.args)
    if workers > 1:  # BatchNorm statistics of the global batch, not of each worker's slice
        model = sync_batchnorm(model, cuda=use_cuda)
    model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()  # in place: parameter names, state dicts and saved weights stay the same
    optimizer = make_optimizer(m.optimizer, model)
    tr_images, tr_masks = split.images[train_rows], split.masks[train_rows]
    shuffle_gen = torch.Generator()
    fit = with_pseudo_labels((tr_images, tr_masks), RunFolder(out).path / TARGETS if pseudo
                             and m.pseudo_labels else None, fold, m.pseudo_threshold)  # never in validation
    sampler = _sampler(m, fit[1], shuffle_gen, taught=teaching is not None)
    loaders = make_loaders(fit, (split.images[val_rows], split.masks[val_rows]), m.batch_size,
                           shuffle_gen, sampler)
    taught = Taught(teaching.targets, teaching.cfg) if teaching is not None else None
    if taught is not None:
        loaders = (taught.train_loader(tr_images, tr_masks, split.ids[train_rows], m.batch_size,
                                       shuffle_gen), loaders[1])
        taught.open_unlabeled(len(train_rows), m.batch_size, device, fold)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, *loaders)
    loss_fn = make_loss(m.loss, tr_masks, device)
    a = m.augment
    bank = RockBank.from_arrays(tr_images, tr_masks) if a.rock_target > 0 else None
    rocks = RockImages.from_arrays(tr_images, tr_masks, device) if a.rock_paste > 0 else None
    return FoldSetup(recipe, m, fold, fold_dir, split, train_rows, val_rows, n_filtered, prec,
                     accelerator, model, optimizer, train_dl, val_dl, loss_fn, shuffle_gen,
                     torch.Generator(device=device), bank, rocks, taught,
                     len(fit[0]) - len(tr_images), sampler)


def _fit_time_budget(f: FoldSetup, time_budget: float | None, has_state: bool) -> MemberConfig:
    """The member with the epochs --time-budget decided for this fold (`budget`), else as is."""
    from . import budget

    if time_budget is not None and f.accelerator.num_processes > 1:
        raise InputError("--time-budget: not with --workers-per-fold > 1 (each worker would "
                         "time its own steps); give --epochs instead")
    bs = f.member.batch_size
    images, masks = f.split.images, f.split.masks
    epochs = budget.fold_epochs(
        f.fold_dir, time_budget, has_state=has_state, model=f.model, optimizer=f.optimizer,
        accelerator=f.accelerator, train_step=lambda x, y, lr: _train_step(f, x, y, lr),
        val_forward=lambda x: labeled_argmax(f.model(to_model_input(x))),
        train_batch=(images[f.train_rows[:bs]], masks[f.train_rows[:bs]]),
        val_batch=images[f.val_rows[:2 * bs]], n_val=len(f.val_rows),
        steps_per_epoch=len(f.train_dl))
    return f.member if epochs is None else budget.fit_member(f.member, epochs)


def _seed_epoch(f: FoldSetup, epoch: int) -> None:
    """Every draw of epoch `epoch` (shuffle, augmentation, dropout) from its own seed."""
    seed = fold_seed(f.recipe.seed, f.member.name, f.fold, epoch)
    f.shuffle_gen.manual_seed(seed)  # the same on every rank: one shuffle of the global batches
    own = rank_seed(seed, f.accelerator.process_index)  # each rank augments its own slice
    f.aug_gen.manual_seed(own)
    torch.manual_seed(own)  # dropout and anything else drawing from the global RNG
    if f.taught is not None:
        f.taught.start_epoch(seed)


def _train_step(f: FoldSetup, images, masks, lr: float, soft=None) -> tuple[torch.Tensor, int]:
    """One optimizer step on a uint8 batch at `lr` (a taught fold: with the teacher's weighted
    targets `soft`, all zero when not given); returns (detached loss, batch size)."""
    from .augment import augment_batch

    for g in f.optimizer.param_groups:
        g["lr"] = lr
    if f.taught is not None:
        if soft is None:  # the --time-budget probe's batch: the same work, no target
            soft = torch.zeros((len(images), NUM_CLASSES, *images.shape[1:]), device=images.device)
        loss = f.taught.loss(f.model, f.loss_fn, f.member.augment, f.aug_gen, images, masks, soft,
                             rock_images=f.rock_images, rock_bank=f.rock_bank)
    else:
        x, y = augment_batch(to_model_input(images, channels_last=False), masks.long(),
                             f.member.augment, generator=f.aug_gen, rock_images=f.rock_images,
                             rock_bank=f.rock_bank)
        loss = f.loss_fn(f.model(x.contiguous(memory_format=torch.channels_last)), y)
    f.accelerator.backward(loss)
    if f.member.grad_clip > 0:
        f.accelerator.clip_grad_norm_(f.model.parameters(), f.member.grad_clip)
    f.optimizer.step()
    f.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), len(images)


def _train_epoch(f: FoldSetup, state: TrainerState, epoch: int, report: Report,
                 t_epoch: float) -> tuple[float, int, float, float]:
    """One pass over the training loader; returns (mean loss, images, last lr, seconds)."""
    m, base_lr, steps = f.member, f.member.optimizer.lr, len(f.train_dl)
    f.model.train()
    loss_sum = torch.zeros((), device=f.accelerator.device)
    n_img, lr = 0, base_lr
    for i, batch in enumerate(f.train_dl):  # (images, masks[, weighted targets])
        lr = lr_at(m.schedule, base_lr, state.step, steps, m.epochs, state.plateau_scale)
        loss, n = _train_step(f, *batch[:2], lr, *batch[2:])
        loss_sum += loss * n
        n_img += n
        state.step += 1
        report.batch(epoch, i + 1, steps, n_img, t_epoch)
    train_s = time.perf_counter() - t_epoch
    state.train_seconds += train_s
    mean_loss = float(loss_sum.item()) / max(n_img, 1)
    if not math.isfinite(mean_loss):
        raise InputError(f"member {m.name!r} fold {f.fold}: loss became {mean_loss} at epoch "
                         f"{epoch}; lower optimizer.lr or use precision 'no'")
    return mean_loss, n_img, lr, train_s


def _validate_epoch(f: FoldSetup, state: TrainerState, epoch: int,
              probs_out: np.ndarray) -> tuple[float, list, bool]:
    """Score the epoch; a new best saves its weights, else it counts towards plateau and patience.

    Returns (course mIoU, per-class IoU, whether the epoch is the new best).
    """
    from .metrics import class_iou, course_miou
    from .models.registry import save_pretrained

    m = f.member
    cm = validate(f.model, f.val_dl, f.accelerator, probs_out=probs_out)
    miou, iou = course_miou(cm), class_iou(cm)
    score = miou if math.isfinite(miou) else -1.0
    if state.best_miou is None or score > state.best_miou or not len(f.val_rows):  # all: last
        state.best_miou, state.best_epoch, state.bad_epochs, state.plateau_bad = score, epoch, 0, 0
        if f.accelerator.is_main_process:
            save_pretrained(f.accelerator.unwrap_model(f.model), f.fold_dir,
                            extra={"member": m.name, "fold": f.fold, "recipe": f.recipe.name,
                                   "epoch": epoch, "val_miou": round_score(miou),
                                   "val_iou": [round_score(v) for v in iou]})
        return miou, iou, True
    state.bad_epochs += 1
    state.plateau_bad += 1
    if m.schedule.name == "plateau" and state.plateau_bad >= m.schedule.plateau_patience:
        state.plateau_scale *= m.schedule.gamma
        state.plateau_bad = 0
    if m.patience and state.bad_epochs >= m.patience:
        state.stopped_early = True
    return miou, iou, False


def _trainer_record(f: FoldSetup, state: TrainerState) -> dict:
    """trainer.json: the state, and with N > 1 workers the N (its weights' names depend on it)."""
    n = f.accelerator.num_processes
    return state.to_json() if n == 1 else {**state.to_json(), "workers": n}


def _finish(f: FoldSetup, state: TrainerState, best_probs: np.ndarray | None, run: RunFolder,
            t_start: float) -> Done:
    """Write the out-of-fold file, then done.json (last: the fold is finished); returns done.
    Rank 0 writes; the other ranks of a data-parallel fold wait and return what it wrote."""
    m, val_images = f.member, f.split.images[f.val_rows]
    if not f.accelerator.is_main_process:
        f.accelerator.wait_for_everyone()
        return run.read_done(m.name, f.fold)
    if best_probs is None and len(val_images):  # best epoch trained by an earlier attempt
        rt = Resolved(f.accelerator.device, f.precision)
        best_probs = predict_oof(f.fold_dir, rt, val_images, 2 * m.batch_size)
    if len(val_images):  # fold "all" has no held-out images
        write_oof(f.fold_dir / OOF, f.split.ids[f.val_rows], best_probs)
    rows = read_metrics(f.fold_dir / METRICS)
    best_row = next((r for r in rows if r["epoch"] == state.best_epoch), {})
    iou = best_row.get("val_iou")
    sampling = None if f.sampler is None else {  # what the sampler drew from (absent: shuffle)
        **dataclasses.asdict(m.sampling), "n_train_rare": int(f.sampler.rare.sum())}
    done = Done(member=m.name, fold=f.fold, recipe=f.recipe.name, best_epoch=state.best_epoch,
                val_miou=best_row.get("val_miou"), val_iou=None if iou is None else tuple(iou),
                epochs=m.epochs, epochs_run=state.epoch + 1, stopped_early=state.stopped_early,
                n_train=int(len(f.train_rows)), n_train_filtered=int(f.n_filtered),
                n_val=int(len(f.val_rows)), n_pseudo=f.n_pseudo, precision=f.precision,
                device=str(f.accelerator.device), workers=f.accelerator.num_processes,
                train_seconds=round(state.train_seconds, 3),
                sha256=sha256_file(f.fold_dir / WEIGHTS),
                seconds_this_attempt=round(time.perf_counter() - t_start, 3), sampling=sampling)
    run.write_done(done)
    f.accelerator.wait_for_everyone()
    return done


# --- the loop ---------------------------------------------------------------------------------


def train_one_fold(recipe: Recipe, member: str | MemberConfig, fold: int | str, data, out,
                   *, rt: Resolved | None = None, precision: str = "auto",
                   splits: dict | None = None, threads: int | None = None,
                   progress: Progress | None = None, time_budget: float | None = None,
                   threads_fn: Callable[[], int] | None = None, compile: bool = False,
                   teaching: Teaching | None = None, pseudo: bool = False,
                   tracking: TrackingSpec | None = None) -> Done:
    """Train `member` of `recipe` on fold `fold` of `data` into its fold folder of run folder `out`.

    fold: a fold number, or "all" (every training image, filters applied; nothing held
    out, the last epoch's weights kept; nnU-Net's "fold all"). teaching: learn from a
    teacher's stored targets too (`teaching`: the loss, the streamed targets). pseudo: add
    the test images of the run folder's targets file, labelled by the teacher's models of
    this fold, to the training part.

    data: shard folder (or a loaded train Split). rt: device and precision as the caller
    resolved them (train-folds: `RunOptions.resolve`); without it ``precision`` (auto |
    bf16 | fp16 | no; fp16 is GPU-only) is resolved here for this machine. splits: the
    run's splits as the caller planned them (default: read or made in `out`).
    threads: torch CPU threads for this fold. progress: called
    with each `_progress.Event` ("start", "batch", "epoch", "done") for live display.
    time_budget: wall seconds for this fold's epochs; replaces the member's epochs by a
    count measured once and kept in budget.json (see `budget`). threads_fn: asked at
    every epoch start for the torch thread count (e.g. more when other folds finished).
    compile: torch.compile the forward (state dicts unchanged); for `make bench` only.
    tracking: log to accelerate's trackers as run `member/fold_k`. Returns its `Done`. A
    finished fold returns it at once (its weights checked);
    an interrupted one resumes after its last saved epoch.
    """
    t_start = time.perf_counter()
    m = recipe.member(member) if isinstance(member, str) else member
    run = RunFolder(out)
    done = run.verify_fold(m.name, fold)
    if done is not None:
        return done
    if threads:
        torch.set_num_threads(int(threads))
    track = fold_run(tracking, run.fold_dir(m.name, fold), run.path)
    rt = rt if rt is not None else resolve(None, precision)
    f = _set_up(recipe, m, fold, data, out, rt, splits, compile, teaching, pseudo, track.log_with)
    saved = resume(f.fold_dir, f.accelerator)
    resumed_from = None if saved is None else saved.epoch
    state = saved or TrainerState()
    f = dataclasses.replace(f, member=_fit_time_budget(f, time_budget, has_state=saved is not None))
    m = f.member
    report = Report(progress, m, fold)
    report("start", epoch=state.epoch + 1, resumed_from=resumed_from,
           n_train=len(f.train_rows), n_pseudo=f.n_pseudo, n_val=len(f.val_rows),
           precision=f.precision,
           device=str(f.accelerator.device))
    with track:  # ends the tracked run however the fold ends
        track.start(f, lambda: read_metrics(f.fold_dir / METRICS))
        return _epochs(f, state, resumed_from, report, track, run, t_start, threads_fn)


def _epochs(f: FoldSetup, state: TrainerState, resumed_from: int | None, report: Report,
            track, run: RunFolder, t_start: float, threads_fn: Callable[[], int] | None) -> Done:
    """The epochs left to train, then `_finish`; returns its `Done`."""
    m = f.member
    # Softmax of the validation fold from the current epoch / from the best epoch so far.
    epoch_probs = np.empty((len(f.val_rows), NUM_CLASSES, *IMAGE_SHAPE), np.float16)
    best_probs = None
    for epoch in range(state.epoch + 1, m.epochs):
        if state.stopped_early:
            break
        t_epoch = time.perf_counter()
        _seed_epoch(f, epoch)
        poll_threads(threads_fn)
        loss, n_img, lr, train_s = _train_epoch(f, state, epoch, report, t_epoch)
        miou, iou, improved = _validate_epoch(f, state, epoch, probs_out=epoch_probs)
        if improved:  # keep this epoch's softmax for the out-of-fold file
            spare = best_probs if best_probs is not None else np.empty_like(epoch_probs)
            best_probs, epoch_probs = epoch_probs, spare
        row = {"epoch": epoch, "loss": round(loss, 6), "val_miou": round_score(miou),
               "val_iou": [round_score(v) for v in iou], "lr": lr,
               "img_s": round(n_img / train_s, 2),
               "seconds": round(time.perf_counter() - t_epoch, 3),
               "threads": torch.get_num_threads(), "time": round(time.time(), 3),
               "worker": {"host": socket.gethostname(), "pid": os.getpid()}}
        if resumed_from is not None and epoch == resumed_from + 1:
            row["resumed"] = True
        state.epoch = epoch
        if f.accelerator.num_processes > 1:
            row["workers"] = f.accelerator.num_processes
        if f.accelerator.is_main_process:
            append_metrics(f.fold_dir / METRICS, row)
            save_state(f.accelerator, f.fold_dir, _trainer_record(f, state))
        track.epoch(row)  # after the state: a resumed fold never logs an epoch twice
        report("epoch", epoch=epoch, loss=row["loss"], val_miou=row["val_miou"],
               best_miou=state.best_miou if len(f.val_rows) else None, img_s=row["img_s"],
               seconds=row["seconds"])

    done = _finish(f, state, best_probs, run, t_start)
    if f.taught is not None:
        f.taught.close()
    report("done", epoch=state.epoch, val_miou=done.val_miou)
    return done
