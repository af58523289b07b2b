"""The parts `train.train_one_fold` builds before its loop and after it, kept out of the loop.

Accelerator, optimizer, in-memory data loaders, loss, saving and resuming accelerate's
state, and the out-of-fold prediction of the saved best weights. Nothing here decides
what a fold learns; `train` does (its loop, validation, best-epoch bookkeeping).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import IMAGE_SHAPE, NUM_CLASSES
from ._io import atomic_path
from .config import MemberConfig, Recipe
from .errors import InputError
from .runfolder import STATE, read_trainer, write_trainer


def make_accelerator(precision: str, cpu: bool, split_batches: bool = False):
    """The fold's Accelerator. split_batches (data-parallel folds): each loader batch is the
    global batch, and every process takes its 1/N slice of it (`dataparallel`)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, PartialState

    # One process may train several folds (--sequential, tests); accelerate keeps a
    # process-wide singleton that refuses a second Accelerator with other settings.
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    if not split_batches:
        return Accelerator(mixed_precision=precision, cpu=cpu)
    return Accelerator(mixed_precision=precision, cpu=cpu,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
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


def make_loss(cfg, train_masks: np.ndarray, device) -> torch.nn.Module:
    """The member's CombinedLoss; class weights from the pixel counts of the training masks."""
    from .losses import CombinedLoss, class_weights

    counts = np.bincount(train_masks.reshape(-1), minlength=NUM_CLASSES)[:NUM_CLASSES]
    weight = None
    if cfg.class_weights != "none":
        weight = class_weights(counts.tolist(), cfg.class_weights, beta=cfg.beta,
                               ignore_background=cfg.ignore_background)
    return CombinedLoss(cfg.terms, weight=weight, ignore_background=cfg.ignore_background,
                        focal_gamma=cfg.focal_gamma).to(device)


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


def make_loaders(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 batch_size: int, shuffle_gen: torch.Generator) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders over (images, masks) uint8 arrays; validation batches are 2x larger."""
    drop_last = len(train[0]) > batch_size  # no 1-image BatchNorm batches, never an empty epoch
    train_dl = DataLoader(InMemory(*train), batch_size=batch_size, shuffle=True,
                          generator=shuffle_gen, drop_last=drop_last, collate_fn=_whole_batch)
    val_dl = DataLoader(InMemory(*val), batch_size=2 * batch_size, shuffle=False,
                        collate_fn=_whole_batch)
    return train_dl, val_dl


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W) on device -> float (B,1,H,W) 0..255, channels_last (the model normalises)."""
    return images.unsqueeze(1).float().contiguous(memory_format=torch.channels_last)


def poll_threads(threads_fn: Callable[[], int] | None) -> None:
    """Apply the thread count `threads_fn` asks for now (e.g. a share of idle cores)."""
    n = threads_fn() if threads_fn is not None else None
    if n and n != torch.get_num_threads():
        torch.set_num_threads(int(n))


def save_state(accelerator, fold_dir: Path, trainer: dict) -> None:
    """accelerate.save_state + trainer.json into a temp folder, then swapped in as state/."""
    with atomic_path(fold_dir / STATE) as tmp:
        accelerator.save_state(str(tmp))
        write_trainer(tmp, trainer)


def load_state(accelerator, state: Path) -> dict:
    """Restore accelerate's state (model, optimizer, RNGs) from `state`; returns trainer.json."""
    trainer = read_trainer(state)
    try:
        accelerator.load_state(str(state))
    except Exception as e:  # noqa: BLE001 - a corrupt state must not surface as a traceback
        raise InputError(f"{state}: cannot resume from the saved training state "
                         f"({type(e).__name__}); delete it to train the fold from epoch 0") from None
    return trainer


def predict_oof(fold_dir: Path, images: np.ndarray, accelerator, batch_size: int) -> np.ndarray:
    """Softmax (n,5,H,W) f16 of the saved best weights, reloaded with load_pretrained."""
    from .models.registry import load_pretrained

    model = load_pretrained(fold_dir, map_location=accelerator.device)
    model = model.to(memory_format=torch.channels_last)
    out = np.empty((len(images), NUM_CLASSES, *IMAGE_SHAPE), np.float16)
    with torch.no_grad(), accelerator.autocast():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(images[s:s + batch_size]).to(accelerator.device)
            p = torch.softmax(model(to_model_input(x)).float(), dim=1)
            out[s:s + len(x)] = p.half().cpu().numpy()
    return out


@dataclasses.dataclass
class FoldSetup:
    """What `train_one_fold` builds before epoch 0 (plain data, no behaviour)."""

    recipe: Recipe
    member: MemberConfig  # its epochs replaced once by --time-budget, before epoch 0
    fold: int
    fold_dir: Path
    split: object  # the train Split
    train_rows: np.ndarray
    val_rows: np.ndarray
    n_filtered: int  # training rows the member's filters dropped
    precision: str
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_dl: DataLoader
    val_dl: DataLoader
    loss_fn: torch.nn.Module
    shuffle_gen: torch.Generator
    aug_gen: torch.Generator
    rock_bank: object
    rock_images: object


class Report:
    """Progress events of one fold: "start", "epoch", "done" as they come, "batch" every 2 s."""

    def __init__(self, progress: Callable[[dict], None] | None, member: MemberConfig, fold: int):
        self.progress, self.member, self.fold = progress, member, fold
        self.last_batch = time.perf_counter()

    def __call__(self, event: str, **kw) -> None:
        if self.progress is not None:
            self.progress({"event": event, "member": self.member.name, "fold": self.fold,
                           "epochs": self.member.epochs, "pid": os.getpid(), "time": time.time(),
                           **kw})

    def batch(self, epoch: int, batch: int, batches: int, n_img: int, t_epoch: float) -> None:
        if self.progress is not None and time.perf_counter() - self.last_batch > 2.0:
            self.last_batch = time.perf_counter()
            self("batch", epoch=epoch, batch=batch, batches=batches,
                 img_s=n_img / (self.last_batch - t_epoch))
