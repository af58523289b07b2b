"""Rare-class sampling: exact draw counts, seeded order, training part only, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from marsseg.config import parse_recipe
from marsseg.data import load_split
from marsseg.data.loaders import make_loaders
from marsseg.data.sampling import RareClassSampler, draw_counts, expected_draws, holds_class
from marsseg.train import ensure_splits, fold_rows, train_one_fold


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_holds_class_counts_pixels_per_image():
    masks = np.ones((3, 2, 4), np.uint8)
    masks[1, 0, :2] = 4
    masks[2, 1, 3] = 4
    assert holds_class(masks, 4).tolist() == [False, True, True]
    assert holds_class(masks, 4, min_pixels=2).tolist() == [False, True, False]
    assert holds_class(masks, 1, min_pixels=8).tolist() == [True, False, False]


def test_expected_draws_keep_the_epoch_length_and_the_factor():
    rare = np.array([True, False, False, False])
    e = expected_draws(rare, 3.0)
    # weights 3, 1, 1, 1 over 4 draws: 2, 2/3, 2/3, 2/3
    np.testing.assert_allclose(e, [2.0, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(expected_draws(rare, 1.0), np.ones(4))
    np.testing.assert_allclose(expected_draws(np.zeros(5, bool), 7.0), np.ones(5))


def test_draw_counts_are_floor_or_ceil_with_the_right_frequencies():
    e = np.array([2.0, 0.25, 0.5, 0.75, 1.5])  # sums to 5
    g = gen(0)
    n = 4000
    got = np.stack([draw_counts(e, g) for _ in range(n)])
    assert (got.sum(1) == 5).all()
    assert ((got == np.floor(e)) | (got == np.ceil(e))).all()
    assert (got[:, 0] == 2).all()  # a whole expectation is drawn exactly
    np.testing.assert_allclose(got.mean(0), e, atol=0.03)  # extra draw with p = e - floor(e)


def test_sampler_draws_rare_images_factor_times_as_often_and_is_seeded():
    rare = np.zeros(100, bool)
    rare[::5] = True  # 20 rare images
    s = RareClassSampler(rare, 3.0, gen(1))
    counts = np.zeros(100)
    for _ in range(300):
        idx = list(s)
        assert len(idx) == len(s) == 100
        c = np.bincount(idx, minlength=100)
        assert c[~rare].max() <= 1  # common images at most once per epoch
        counts += c
    ratio = counts[rare].mean() / counts[~rare].mean()
    assert ratio == pytest.approx(3.0, rel=0.05)
    # the order is a function of the generator's seed alone
    a = RareClassSampler(rare, 3.0, gen(5))
    b = RareClassSampler(rare, 3.0, gen(5))
    assert list(a) == list(b)
    a.generator.manual_seed(9)
    first = list(a)
    a.generator.manual_seed(9)
    assert list(a) == first and list(a) != first


def test_sampler_without_rare_images_is_a_permutation():
    s = RareClassSampler(np.zeros(10, bool), 4.0, gen(0))
    assert sorted(s) == list(range(10))
    with pytest.raises(ValueError, match="factor"):
        RareClassSampler(np.ones(3, bool), 0.0, gen(0))


def test_loader_samples_the_training_part_only():
    """The sampler sees the training arrays it is given; validation stays in order, once each."""
    rng = np.random.default_rng(0)
    tr_masks = rng.integers(1, 4, (40, 4, 8)).astype(np.uint8)
    tr_masks[:8, 0, 0] = 4  # 8 of 40 training images hold big rock
    tr_images = np.arange(40, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(8, 2)
    val_masks = np.full((6, 4, 8), 4, np.uint8)  # all big rock: would dominate if resampled
    val_images = (100 + np.arange(6, dtype=np.uint8))[:, None, None].repeat(4, 1).repeat(8, 2)
    g = gen(3)
    tr, val = make_loaders((tr_images, tr_masks), (val_images, val_masks), 8, g,
                           RareClassSampler(holds_class(tr_masks, 4), 4.0, g))
    assert isinstance(tr.sampler, RareClassSampler) and len(tr) == 5
    shares = []
    for _ in range(20):
        seen = torch.cat([x[:, 0, 0] for x, _ in tr]).tolist()
        assert len(seen) == 40 and max(seen) < 40  # training images only
        counts = np.bincount(seen, minlength=40)
        # expected draws: 40 * 4 / (8 * 4 + 32) = 2.5 per big-rock image, 0.625 per other
        assert set(counts[:8]) <= {2, 3} and set(counts[8:]) <= {0, 1}
        shares.append(counts[:8].sum() / 40)
    assert np.mean(shares) == pytest.approx(0.5, abs=0.02)
    assert torch.cat([x[:, 0, 0] for x, _ in val]).tolist() == list(range(100, 106))
    # no sampler: the plain shuffle (what every recipe without sampling trains with)
    plain, _ = make_loaders((tr_images, tr_masks), (val_images, val_masks), 8, g)
    assert isinstance(plain.sampler, torch.utils.data.RandomSampler)


def tiny_recipe(epochs: int, factor: float):
    m = {"name": "tiny", "epochs": epochs, "batch_size": 16,
         "model": {"name": "unet", "args": {"base_width": 4, "depth": 2}},
         "loss": {"terms": {"ce": 1.0, "lovasz": 1.0}, "ignore_background": True},
         "sampling": {"factor": factor}}
    return parse_recipe({"folds": 2, "seed": 3, "members": [m]}, name="tiny")


class Interrupt(Exception):
    pass


def test_sampled_fold_resumes_exactly_and_records_its_sampling(shards, tmp_path):
    r = tiny_recipe(3, 3.0)
    whole = train_one_fold(r, "tiny", 0, shards, tmp_path / "a", threads=1, precision="no")

    def stop_after_1(ev):
        if ev.event == "epoch" and ev.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_one_fold(r, "tiny", 0, shards, tmp_path / "b", threads=1, precision="no",
                       progress=stop_after_1)
    resumed = train_one_fold(r, "tiny", 0, shards, tmp_path / "b", threads=1, precision="no")
    a = load_file(str(tmp_path / "a" / "tiny" / "fold_0" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "tiny" / "fold_0" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed.sha256 == whole.sha256

    split = load_split(shards, "train")
    train, _, _ = fold_rows(split, ensure_splits(r, split, tmp_path / "a"), 0, r.members[0])
    n_rare = int(holds_class(split.masks[train], 4).sum())
    assert 0 < n_rare < len(train)
    assert whole.sampling == {"rare_class": 4, "factor": 3.0, "min_pixels": 1,
                              "n_train_rare": n_rare}
    done = json.loads((tmp_path / "a" / "tiny" / "fold_0" / "done.json").read_text())
    assert done["sampling"]["n_train_rare"] == n_rare

    # and it trains something other than the plain shuffle of the same seed
    one = {f: train_one_fold(tiny_recipe(1, f), "tiny", 0, shards, tmp_path / f"c{f}", threads=1,
                             precision="no") for f in (1.0, 3.0)}
    assert one[1.0].sampling is None and one[3.0].sampling["factor"] == 3.0
    assert one[1.0].sha256 != one[3.0].sha256


def test_a_student_recipe_refuses_sampling(tmp_path):
    """A taught (distill) fold streams the teacher's targets in its own shuffle: the key
    would be silently ignored there, so the student recipe names it instead."""
    from marsseg.config import ModelConfig
    from marsseg.errors import InputError
    from marsseg.student import load_student

    p = tmp_path / "student.toml"
    p.write_text('folds = 2\n[[members]]\nname = "s"\n[members.sampling]\nfactor = 2.0\n')
    with pytest.raises(InputError, match=r"student\.toml: members\[0\]\.sampling"):
        load_student(p, ModelConfig("unet", {"base_width": 4, "depth": 2}))


def test_the_sampler_covers_pseudo_labelled_images_too(shards, tmp_path, monkeypatch):
    """With --teacher the training part holds the pseudo-labelled test images as well; the
    sampler indexes that whole part (never validation), so its mask has one entry each."""
    import marsseg.train as train_mod

    seen = {}
    real = train_mod.RareClassSampler

    def spy(rare, factor, gen):
        seen["n"] = len(rare)
        return real(rare, factor, gen)

    monkeypatch.setattr(train_mod, "RareClassSampler", spy)
    extra = np.zeros((5, 64, 128), np.uint8)
    monkeypatch.setattr(train_mod, "with_pseudo_labels",
                        lambda train, path, fold, thr: (np.concatenate([train[0], extra]),
                                                  np.concatenate([train[1], extra + 4])))
    r = tiny_recipe(1, 2.0)
    done = train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, precision="no")
    split = load_split(shards, "train")
    train, _, _ = fold_rows(split, ensure_splits(r, split, tmp_path), 0, r.members[0])
    assert seen["n"] == len(train) + 5
    assert done.sampling["n_train_rare"] == int(holds_class(split.masks[train], 4).sum()) + 5
