"""Seeded k-fold splits, grouped and stratified by big rock, made once per run folder.

Groups (e.g. the two bands of one real_mars image, or a whole NAVCAM sequence) never
straddle folds, so validation scores are honest. Groups holding Big Rock pixels are
dealt out first, round-robin to the fold with the fewest big-rock images, so every
fold can score class 4; the rest go largest first to the smallest fold.

`plan_splits` reads a run folder's splits or makes them (written once, then checked
against the recipe and the data); `fold_rows` turns a fold into training and validation
rows, the member's filters applied to the training rows only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import MemberConfig, Recipe
from .errors import InputError
from .runfolder import RunFolder

ALL = "all"  # the fold that trains on every image (nnU-Net's "fold all")


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


# --- a run's splits and a fold's rows ---------------------------------------------------------


def load_train(data) -> object:
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


def fold_rows(split, splits: dict, fold: int | str, member: MemberConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Positions (train, val) into `split` for `fold`; the member's filters drop training rows only.

    fold "all": every row trains (filters applied), none validates.
    Returns (train_rows, val_rows sorted by id, number of training rows filtered out).
    """
    pos = {int(i): p for p, i in enumerate(split.ids)}
    if fold == ALL:
        val = np.zeros(0, np.int64)
    elif not isinstance(fold, int) or not 0 <= fold < splits["k"]:
        raise InputError(f"fold {fold} is out of range for k={splits['k']}")
    else:
        val = np.array(sorted(pos[int(i)] for i in splits["folds"][fold]["val_ids"]), np.int64)
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
