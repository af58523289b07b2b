"""torch DataLoaders over in-memory uint8 arrays: what a training fold iterates.

A fold's images and masks (a few thousand 64x128 uint8 images) fit in memory, so
`InMemory.__getitems__` slices a whole batch at once instead of collating single
items; the loaders yield (images uint8 (B, H, W), masks uint8 (B, H, W)).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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
                 batch_size: int, shuffle_gen: torch.Generator,
                 sampler: Sampler | None = None) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders over (images, masks) uint8 arrays; validation batches are 2x larger.

    The training order is a shuffle from `shuffle_gen`, or `sampler`'s (e.g. a
    `data.sampling.RareClassSampler` drawing from that same generator); validation is in order.
    """
    drop_last = len(train[0]) > batch_size  # no 1-image BatchNorm batches, never an empty epoch
    order: dict = {"shuffle": True, "generator": shuffle_gen} if sampler is None else {
        "sampler": sampler}
    train_dl = DataLoader(InMemory(*train), batch_size=batch_size, drop_last=drop_last,
                          collate_fn=_whole_batch, **order)
    val_dl = DataLoader(InMemory(*val), batch_size=2 * batch_size, shuffle=False,
                        collate_fn=_whole_batch)
    return train_dl, val_dl
