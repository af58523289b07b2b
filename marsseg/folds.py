"""Seeded k-fold splits, grouped and stratified by big rock, made once per run folder.

Groups (e.g. the two bands of one real_mars image, or a whole NAVCAM sequence) never
straddle folds, so validation scores are honest. Groups holding Big Rock pixels are
dealt out first, round-robin to the fold with the fewest big-rock images, so every
fold can score class 4; the rest go largest first to the smallest fold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError


def make_splits(
    groups: Sequence[str], big_rock: Sequence[bool], k: int, seed: int
) -> list[np.ndarray]:
    """k arrays of positions (validation rows into the split's arrays), sorted, disjoint, covering.

    groups: one key per row; big_rock: per row, whether it holds any Big Rock pixel.
    """
    groups = np.asarray([str(g) for g in groups])
    big = np.asarray(big_rock, dtype=bool)
    if len(groups) != len(big):
        raise InputError(f"folds: {len(groups)} group keys but {len(big)} big-rock flags")
    if k < 2:
        raise InputError(f"folds: k must be at least 2 (got {k})")
    keys, inverse = np.unique(groups, return_inverse=True)
    if k > len(keys):
        raise InputError(f"folds: k={k} is more than the {len(keys)} groups in the data")
    size = np.bincount(inverse, minlength=len(keys))
    rocks = np.bincount(inverse, weights=big, minlength=len(keys)).astype(int)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    # Stable sorts on a shuffled order: big-rock groups first, each part largest first.
    order = order[np.argsort(-size[order], kind="stable")]
    order = order[np.argsort(rocks[order] == 0, kind="stable")]
    fold_n = np.zeros(k, int)
    fold_rock = np.zeros(k, int)
    tie = rng.permutation(k)  # seeded tie-break so fold 0 is not always filled first
    assign = np.empty(len(keys), int)
    for g in order:
        if rocks[g] > 0:
            f = min(range(k), key=lambda j: (fold_rock[j], fold_n[j], tie[j]))
        else:
            f = min(range(k), key=lambda j: (fold_n[j], tie[j]))
        assign[g] = f
        fold_n[f] += size[g]
        fold_rock[f] += rocks[g]
    row_fold = assign[inverse]
    return [np.flatnonzero(row_fold == f) for f in range(k)]


def splits_dict(folds: Sequence[np.ndarray], ids: Sequence[int], k: int, seed: int) -> dict:
    """{"k","seed","folds":[{"fold","val_ids","train_ids"}]} (ids = source rows), as the run
    folder stores it (`runfolder.save_splits`)."""
    ids = np.asarray(ids, np.int64)
    out = {"k": int(k), "seed": int(seed), "folds": []}
    for f, pos in enumerate(folds):
        val = np.zeros(len(ids), bool)
        val[np.asarray(pos, np.int64)] = True
        out["folds"].append(
            {"fold": f, "val_ids": ids[val].tolist(), "train_ids": ids[~val].tolist()}
        )
    return out
