"""Seeded k-fold splits, grouped and stratified by big rock, written once to splits.json.

Groups (e.g. the two bands of one real_mars image, or a whole NAVCAM sequence) never
straddle folds, so validation scores are honest. Groups holding Big Rock pixels are
dealt out first, round-robin to the fold with the fewest big-rock images, so every
fold can score class 4; the rest go largest first to the smallest fold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

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


def save_splits(
    path: Path, folds: Sequence[np.ndarray], ids: Sequence[int], k: int, seed: int
) -> dict:
    """Write splits.json {"k","seed","folds":[{"fold","val_ids","train_ids"}]} (ids = source rows)."""
    ids = np.asarray(ids, np.int64)
    out = {"k": int(k), "seed": int(seed), "folds": []}
    for f, pos in enumerate(folds):
        val = np.zeros(len(ids), bool)
        val[np.asarray(pos, np.int64)] = True
        out["folds"].append(
            {"fold": f, "val_ids": ids[val].tolist(), "train_ids": ids[~val].tolist()}
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(out))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_splits(path: Path) -> dict:
    """Read and check splits.json (keys, one entry per fold, val sets disjoint)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        d = json.loads(path.read_text())
        k, folds = int(d["k"]), d["folds"]
        if len(folds) != k or [f["fold"] for f in folds] != list(range(k)):
            raise InputError(f"{path}: expected folds 0..{k - 1}")
        seen: set[int] = set()
        for f in folds:
            val = set(f["val_ids"])
            if seen & val:
                raise InputError(
                    f"{path}: fold {f['fold']} shares validation ids with another fold"
                )
            seen |= val
            f["train_ids"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed splits file ({type(e).__name__}: {e})") from None
    return d
