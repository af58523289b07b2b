"""Which training images an epoch shows: a plain shuffle, or a rare class's images more often.

`RareClassSampler` draws the images that hold a rare class (Big Rock) `factor` times as
often as the others. An epoch keeps as many draws as there are training images, so its
steps, its LR schedule and its cost match a plain shuffle at the same epoch count. The
draws are as even as that allows: each image is drawn floor(e) or ceil(e) times, e its
expected count (systematic sampling), so an image of the common classes is drawn at most
once per epoch and none is left out by chance more often than the oversampling needs.

Every draw comes from the generator it is given; the training loop re-seeds that one
generator at each epoch start, so a resumed fold draws exactly the epochs an
uninterrupted one would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def holds_class(masks: np.ndarray, cls: int, min_pixels: int = 1) -> np.ndarray:
    """Per image, whether it holds at least `min_pixels` pixels of class `cls`.

    masks uint8 (n, H, W) -> bool (n,).
    """
    return (masks == cls).reshape(len(masks), -1).sum(1) >= min_pixels


def expected_draws(rare: np.ndarray, factor: float) -> np.ndarray:
    """Expected draws per image in an epoch of len(rare) draws; rare images weigh `factor`.

    rare bool (n,) -> float64 (n,), summing to n.
    """
    w = np.where(rare, float(factor), 1.0)
    return len(w) * w / w.sum()


def draw_counts(expected: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Integer draws per image: floor(e) plus one more for a subset picked by systematic
    sampling over a random order, so image i gets the extra draw with probability
    e_i - floor(e_i) and the total is exactly round(sum(e)).

    expected float (n,) >= 0 -> int64 (n,).
    """
    base = np.floor(expected)
    frac = expected - base
    extra = int(round(float(expected.sum()) - base.sum()))
    counts = base.astype(np.int64)
    if extra == 0:
        return counts
    order = torch.randperm(len(expected), generator=generator).numpy()
    cum = np.cumsum(frac[order])
    cum[-1] = extra  # the exact total; float sums drift by ulps
    u = 1.0 - float(torch.rand((), generator=generator, dtype=torch.float64))  # (0, 1]
    steps = np.floor(cum - u)
    picked = np.diff(np.concatenate([[-1.0], steps])) > 0  # the cumulative sum passed k + u
    counts[order[picked]] += 1
    return counts


class RareClassSampler(Sampler[int]):
    """Indices into the training images for one epoch: rare-class images `factor` times as
    often, len(rare) draws in a random order, all from `generator`."""

    def __init__(self, rare: np.ndarray, factor: float, generator: torch.Generator):
        rare = np.asarray(rare, bool)
        if rare.ndim != 1 or len(rare) == 0 or not factor > 0:
            raise ValueError(f"need a non-empty 1-d rare mask and factor > 0, got "
                             f"{rare.shape} and {factor}")
        self.rare, self.factor, self.generator = rare, float(factor), generator
        self.expected = expected_draws(rare, factor)

    def __len__(self) -> int:
        return len(self.rare)

    def __iter__(self) -> Iterator[int]:
        counts = draw_counts(self.expected, self.generator)
        idx = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
        order = torch.randperm(len(idx), generator=self.generator)
        return iter(idx[order].tolist())
