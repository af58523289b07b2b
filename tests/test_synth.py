"""The synthetic generator: layout, determinism, class make-up, outliers, speed."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from marsseg.errors import InputError
from marsseg.synth import default_n_outliers, make_synthetic, write_synthetic


@pytest.fixture(scope="module")
def big():
    return make_synthetic(240, 20, seed=5, n_outliers=15)


def test_layout_and_dtypes(synth_arrays):
    a = synth_arrays
    assert a["training_set"].shape == (160, 2, 64, 128) and a["training_set"].dtype == np.uint8
    assert a["test_set"].shape == (40, 64, 128) and a["test_set"].dtype == np.uint8
    assert a["test_masks"].shape == (40, 64, 128) and a["test_masks"].dtype == np.uint8
    assert a["training_source"].shape == (160,) and a["test_source"].shape == (40,)
    assert a["training_set"][:, 1].max() <= 4 and a["test_masks"].max() <= 4
    assert all("#" in s for s in a["training_source"])


def test_deterministic_per_seed():
    a, b, c = (make_synthetic(20, 5, seed=s, n_outliers=0) for s in (1, 1, 2))
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["training_set"], c["training_set"])


def test_write_is_readable_and_atomic(tmp_path):
    p = tmp_path / "sub" / "s.npz"
    arrays = write_synthetic(p, 8, 2, seed=0)
    with np.load(p) as z:
        assert sorted(z.files) == sorted(arrays)
        assert np.array_equal(z["training_set"], arrays["training_set"])
    assert [x.name for x in p.parent.iterdir()] == ["s.npz"]


def test_class_make_up(big):
    masks = big["training_set"][:, 1]
    share = np.bincount(masks.ravel(), minlength=5) / masks.size
    assert 0.001 <= share[4] <= 0.01  # big rock is rare
    assert all(share[c] > 0.1 for c in (1, 2, 3))
    assert 0.02 < share[0] < 0.4  # sky, rover, unlabeled patches
    bg = (masks == 0).mean(axis=(1, 2))
    assert (bg > 0.8).any() and (bg == 0).any()
    assert ((masks == 4).any(axis=(1, 2))).mean() < 0.4


def test_dark_navcam_like(big):
    mean = big["training_set"][:, 0].mean()
    assert 40 < mean < 90
    per_image = big["training_set"][:, 0].mean(axis=(1, 2))
    assert per_image.std() > 8  # brightness jitter between images


def test_no_single_threshold_separates_terrain(big):
    """Best global-threshold balanced accuracy between any two terrain classes stays low."""
    img, m = big["training_set"][:, 0].ravel(), big["training_set"][:, 1].ravel()
    t = np.arange(256)[:, None]
    for a, b in ((1, 2), (1, 3), (2, 3)):
        xa, xb = img[m == a][::7], img[m == b][::7]
        ra, rb = (xa[None] > t).mean(1), (xb[None] > t).mean(1)
        balanced = np.maximum((1 - ra + rb) / 2, (ra + 1 - rb) / 2).max()
        assert balanced < 0.7, (a, b, balanced)


def test_outliers_share_one_multiclass_mask(big):
    masks = big["training_set"][:, 1]
    hashes = [hashlib.sha1(m.tobytes()).hexdigest() for m in masks]
    counts = {h: hashes.count(h) for h in set(hashes)}
    top = max(counts.values())
    assert top == 15 and sorted(counts.values())[-2] < 10
    alien = masks[hashes.index(max(counts, key=counts.get))]
    assert len(set(np.unique(alien)) - {0}) >= 2
    rows = [i for i, h in enumerate(hashes) if counts[h] == 15]
    groups = [big["training_source"][i].split("#")[0] for i in rows]
    assert len(set(groups)) == 15  # each outlier its own group


def test_band_pairs_share_a_group(big):
    groups = [s.split("#")[0] for s in big["training_source"]]
    sizes = np.unique(groups, return_counts=True)[1]
    assert sizes.max() == 2 and (sizes == 2).sum() > 20


def test_default_outliers():
    assert default_n_outliers(20) == 0
    assert default_n_outliers(400) == 20
    assert default_n_outliers(2615) == 110
    assert default_n_outliers(100) == 12


def test_bad_arguments():
    with pytest.raises(InputError, match="--n-train"):
        make_synthetic(0, 5)
    with pytest.raises(InputError, match="--n-test"):
        make_synthetic(5, -1)
    with pytest.raises(InputError, match="--n-test must be at least 1"):
        make_synthetic(5, 0)
    with pytest.raises(InputError, match=r"--seed must be >= 0 \(got -1\)"):
        make_synthetic(5, 1, seed=-1)
    with pytest.raises(InputError, match="--n-outliers"):
        make_synthetic(5, 1, n_outliers=6)


def test_fast():
    t = time.perf_counter()
    make_synthetic(200, 50, seed=0)
    assert time.perf_counter() - t < 5.0  # ~0.35 s alone; generous for a shared machine
