"""Fold properties: deterministic, disjoint, covering, groups intact, big rock spread."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marsseg.errors import InputError
from marsseg.folds import make_splits, splits_dict
from marsseg.runfolder import load_splits, save_splits


@st.composite
def datasets(draw):
    n_groups = draw(st.integers(2, 40))
    sizes = draw(st.lists(st.integers(1, 4), min_size=n_groups, max_size=n_groups))
    rock_groups = draw(st.lists(st.booleans(), min_size=n_groups, max_size=n_groups))
    groups, big = [], []
    for g, (size, rock) in enumerate(zip(sizes, rock_groups, strict=True)):
        for j in range(size):
            groups.append(f"img{g}")
            big.append(rock and j == 0)  # one band of the image holds the rock
    perm = np.random.default_rng(draw(st.integers(0, 99))).permutation(len(groups))
    k = draw(st.integers(2, min(6, n_groups)))
    return [groups[i] for i in perm], [big[i] for i in perm], k, draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None)
@given(datasets())
def test_fold_properties(case):
    groups, big, k, seed = case
    folds = make_splits(groups, big, k, seed)
    assert len(folds) == k
    again = make_splits(groups, big, k, seed)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))
    allpos = np.concatenate(folds)
    assert sorted(allpos.tolist()) == list(range(len(groups)))  # disjoint and covering
    fold_of = np.empty(len(groups), int)
    for f, pos in enumerate(folds):
        assert np.all(np.diff(pos) > 0)
        fold_of[pos] = f
    for g in set(groups):
        assert len({fold_of[i] for i, x in enumerate(groups) if x == g}) == 1  # never split
    big = np.asarray(big)
    rock_groups = {g for g, b in zip(groups, big, strict=True) if b}
    rocks = [int(big[pos].sum()) for pos in folds]
    if len(rock_groups) >= k:
        assert min(rocks) >= 1, rocks
    assert max(rocks) - min(rocks) <= 1  # one rock per group here, so dealt evenly
    sizes = [len(p) for p in folds]
    assert all(s > 0 for s in sizes)


def test_seed_changes_folds():
    groups = [f"g{i // 2}" for i in range(200)]
    big = [i % 17 == 0 for i in range(200)]
    a = make_splits(groups, big, 5, seed=0)
    b = make_splits(groups, big, 5, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert max(len(x) for x in a) - min(len(x) for x in a) <= 2


def test_on_prepared_shards(shards):
    from marsseg.data import load_split

    s = load_split(shards, "train")
    folds = make_splits(s.groups, s.big_rock, 4, seed=0)
    rocks = [int(s.big_rock[f].sum()) for f in folds]
    assert min(rocks) >= 1 and max(rocks) - min(rocks) <= 2
    for f in folds:
        other = np.setdiff1d(np.arange(len(s)), f)
        assert not set(s.groups[f]) & set(s.groups[other])


def test_save_load_roundtrip(tmp_path):
    ids = np.arange(10, 30)
    groups = [str(i // 2) for i in range(20)]
    folds = make_splits(groups, [False] * 20, 3, seed=4)
    out = splits_dict(folds, ids, 3, 4)
    save_splits(tmp_path / "run" / "splits.json", out)
    d = load_splits(tmp_path / "run" / "splits.json")
    assert d == out and d["k"] == 3 and d["seed"] == 4
    for f, pos in zip(d["folds"], folds, strict=True):
        assert f["val_ids"] == ids[pos].tolist()
        assert sorted(f["val_ids"] + f["train_ids"]) == ids.tolist()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["splits.json"]


def test_errors(tmp_path):
    with pytest.raises(InputError, match="k must be at least 2"):
        make_splits(["a", "b"], [False, False], 1, 0)
    with pytest.raises(InputError, match="more than the 2 groups"):
        make_splits(["a", "b", "b"], [False] * 3, 3, 0)
    with pytest.raises(InputError, match="big-rock flags"):
        make_splits(["a", "b"], [False], 2, 0)
    with pytest.raises(InputError, match="no such file"):
        load_splits(tmp_path / "nope.json")
    (tmp_path / "s.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_splits(tmp_path / "s.json")
    (tmp_path / "s.json").write_text('{"k": 2, "folds": [{"fold": 0}]}')
    with pytest.raises(InputError, match="s.json"):
        load_splits(tmp_path / "s.json")
