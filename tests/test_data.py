"""npz validation, prepare's shards and dataset.json, reading back, describe."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from marsseg import CLASS_NAMES
from marsseg.data import (
    as_batches,
    class_counts,
    describe,
    duplicate_mask_groups,
    iter_batches,
    load_npz,
    load_split,
    read_dataset,
    shard_paths,
    split_info,
)
from marsseg.data.cleaning import clean_keep
from marsseg.errors import InputError


def test_load_npz(synth_npz, synth_arrays):
    d = load_npz(synth_npz)
    assert np.array_equal(d.train_images, synth_arrays["training_set"][:, 0])
    assert np.array_equal(d.train_masks, synth_arrays["training_set"][:, 1])
    assert np.array_equal(d.test_masks, synth_arrays["test_masks"])
    assert d.train_groups[0] == synth_arrays["training_source"][0].split("#")[0]
    assert d.train_images.dtype == np.uint8 and d.train_images.flags.c_contiguous


def test_dataset_json(shards, synth_npz, synth_arrays):
    info = read_dataset(shards)
    assert info["format_version"] == 1 and info["image_shape"] == [64, 128]
    assert info["class_names"] == list(CLASS_NAMES)
    assert info["source"]["sha256"] == hashlib.sha256(synth_npz.read_bytes()).hexdigest()
    tr, te = info["splits"]["train"], info["splits"]["test"]
    assert (tr["count"], tr["labeled"], te["count"], te["labeled"]) == (160, True, 40, True)
    assert [s["file"] for s in tr["shards"]] == ["train-000.h5", "train-001.h5", "train-002.h5"]
    assert [s["count"] for s in tr["shards"]] == [64, 64, 32]
    for s in tr["shards"] + te["shards"]:
        assert s["sha256"] == hashlib.sha256((shards / s["file"]).read_bytes()).hexdigest()
    masks = synth_arrays["training_set"][:, 1]
    px = info["class_pixel_counts"]
    assert px["train"] == np.bincount(masks.ravel(), minlength=5).tolist()
    assert px["test"] == np.bincount(synth_arrays["test_masks"].ravel(), minlength=5).tolist()
    assert sum(px["train_clean"]) == info["cleaning"]["train_clean_count"] * 64 * 128


def test_exactly_planted_outliers_flagged(shards, synth_arrays):
    planted = [i for i, s in enumerate(synth_arrays["training_source"]) if "-alien-" in s]
    masks = synth_arrays["training_set"][:, 1]
    assert all(np.array_equal(masks[i], masks[planted[0]]) for i in planted)
    cl = read_dataset(shards)["cleaning"]
    assert len(planted) == 12
    assert cl["outlier_ids"] == sorted(planted)
    assert [g["count"] for g in cl["duplicate_mask_groups"]] == [12]
    s = load_split(shards, "train")
    assert np.flatnonzero(s.outlier).tolist() == sorted(planted)


def test_shard_contents(shards, synth_arrays):
    with h5py.File(shards / "train-001.h5") as f:
        assert f.attrs["format_version"] == 1 and f.attrs["split"] == "train"
        assert list(f.attrs["class_names"]) == list(CLASS_NAMES)
        assert f["images"].dtype == np.uint8 and f["images"].shape == (64, 64, 128)
        assert f["ids"].dtype == np.int64 and f["ids"][0] == 64
        assert f["bg_fraction"].dtype == np.float32 and f["outlier"].dtype == np.uint8
        assert h5py.check_string_dtype(f["groups"].dtype) is not None
        assert np.array_equal(f["masks"][()], synth_arrays["training_set"][64:128, 1])
    with h5py.File(shards / "test-000.h5") as f:
        assert f.attrs["split"] == "test" and "masks" in f and "groups" in f


def test_load_split(shards, synth_arrays):
    s = load_split(shards, "train")
    assert len(s) == 160 and s.ids.tolist() == list(range(160))
    assert np.array_equal(s.images, synth_arrays["training_set"][:, 0])
    assert np.array_equal(s.masks, synth_arrays["training_set"][:, 1])
    assert s.groups[5] == synth_arrays["training_source"][5].split("#")[0]
    assert np.allclose(s.bg_fraction, (s.masks == 0).mean(axis=(1, 2)))
    assert np.array_equal(s.class_counts, class_counts(s.masks))
    assert np.array_equal(s.big_rock, (s.masks == 4).any(axis=(1, 2)))
    keep = clean_keep(s.outlier, s.bg_fraction, max_background=0.8)
    assert not s.outlier[keep].any() and (s.bg_fraction[keep] <= 0.8).all()
    assert keep.sum() == read_dataset(shards)["cleaning"]["train_clean_count"]
    t = load_split(shards, "test")
    assert np.array_equal(t.masks, synth_arrays["test_masks"])
    with pytest.raises(InputError, match="unknown split 'val'"):
        load_split(shards, "val")


def test_split_info_npz_and_shards_agree(shards, synth_npz):
    assert (
        split_info(synth_npz, "test")
        == split_info(shards, "test")
        == {"count": 40, "labeled": True}
    )


@pytest.mark.parametrize("bs", [1, 30, 64, 100, 500])
def test_iter_batches(shards, synth_arrays, bs):
    batches = list(iter_batches(shards, "train", bs, with_masks=True))
    assert all(len(b[0]) == bs for b in batches[:-1]) and 0 < len(batches[-1][0]) <= bs
    ids = np.concatenate([b[0] for b in batches])
    assert ids.tolist() == list(range(160))
    assert np.array_equal(
        np.concatenate([b[1] for b in batches]), synth_arrays["training_set"][:, 0]
    )
    assert np.array_equal(
        np.concatenate([b[2] for b in batches]), synth_arrays["training_set"][:, 1]
    )


def test_as_batches_npz_and_shards_agree(shards, synth_npz):
    for split in ("train", "test"):
        a = list(as_batches(shards, split, 16))
        b = list(as_batches(synth_npz, split, 16))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert len(x) == 2 and np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def test_unlabeled_test_split(tmp_path):
    from marsseg.data import prepare

    rng = np.random.default_rng(0)
    tr = np.stack([rng.integers(0, 256, (4, 64, 128)), rng.integers(0, 5, (4, 64, 128))], 1)
    np.savez(
        tmp_path / "u.npz",
        training_set=tr.astype(np.uint8),
        test_set=rng.integers(0, 256, (3, 64, 128)).astype(np.uint8),
    )
    info = prepare(tmp_path / "u.npz", tmp_path / "s")
    assert info["splits"]["test"]["labeled"] is False and info["class_pixel_counts"]["test"] is None
    s = load_split(tmp_path / "s", "test")
    assert s.masks is None and len(s) == 3 and s.groups.tolist() == ["0", "1", "2"]
    with pytest.raises(InputError, match="no masks"):
        list(iter_batches(tmp_path / "s", "test", 2, with_masks=True))
    with pytest.raises(InputError, match="no masks"):
        list(as_batches(tmp_path / "u.npz", "test", 2, with_masks=True))
    assert describe(tmp_path / "s")["test"] == {"count": 3, "labeled": False}


def test_duplicate_mask_groups_rules():
    base = np.zeros((30, 64, 128), np.uint8)
    base[:] = np.arange(128, dtype=np.uint8) % 3  # all different rows below
    alien = np.zeros((64, 128), np.uint8)
    alien[:, :64], alien[:, 64:] = 1, 2
    uniform = np.ones((64, 128), np.uint8)
    uniform[0] = 0
    masks = np.concatenate(
        [np.stack([alien] * 11), np.stack([uniform] * 12), np.stack([alien] * 2)]
    )
    masks = np.concatenate(
        [masks, np.random.default_rng(0).integers(0, 5, (5, 64, 128), dtype=np.uint8)]
    )
    out, uni = duplicate_mask_groups(masks, min_count=10)
    assert [(g["count"], g["classes"]) for g in out] == [(13, [1, 2])]
    assert out[0]["ids"] == list(range(11)) + [23, 24]
    assert [(g["count"], g["classes"]) for g in uni] == [(12, [1])]
    assert duplicate_mask_groups(masks, min_count=14) == ([], [])


def test_describe(shards, synth_npz):
    a, b = describe(shards, 0.5), describe(synth_npz, 0.5)
    for k in ("counts", "class_pixel_counts", "bg_fraction_histogram"):
        assert a[k] == b[k], k
    assert a["counts"]["outliers"] == 12 and sum(a["bg_fraction_histogram"]["train"]) == 160
    assert a["counts"]["train_clean"] < describe(shards, 0.9)["counts"]["train_clean"] + 1


def test_read_dataset_errors(shards, tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        read_dataset(tmp_path / "none")
    with pytest.raises(InputError, match="no dataset.json"):
        read_dataset(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    info = json.loads((shards / "dataset.json").read_text())
    (broken / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="train-000.h5: shard listed in dataset.json is missing"):
        shard_paths(broken, "train")
    (broken / "dataset.json").write_text(json.dumps({**info, "format_version": 9}))
    with pytest.raises(InputError, match="format_version 9"):
        read_dataset(broken)
    (broken / "dataset.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        read_dataset(broken)


def test_empty_test_split_is_refused(tmp_path):
    from marsseg.data import prepare

    tr = np.zeros((3, 2, 64, 128), np.uint8)
    tr[:, 1] = 1
    np.savez(tmp_path / "e.npz", training_set=tr, test_set=np.zeros((0, 64, 128), np.uint8))
    with pytest.raises(InputError, match=r"e\.npz: 'test_set' holds no images"):
        prepare(tmp_path / "e.npz", tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]


def test_bool_arrays_are_refused(tmp_path):
    from marsseg.data import prepare

    tr = np.zeros((3, 2, 64, 128), bool)
    np.savez(tmp_path / "b.npz", training_set=tr, test_set=np.zeros((2, 64, 128), np.uint8))
    with pytest.raises(InputError, match=r"b\.npz: 'training_set' has dtype bool"):
        prepare(tmp_path / "b.npz", tmp_path / "s")
    np.savez(tmp_path / "b.npz", training_set=tr.astype(np.uint8), test_set=np.ones((2, 64, 128), bool))
    with pytest.raises(InputError, match="'test_set' has dtype bool"):
        prepare(tmp_path / "b.npz", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _with_mask_value(shards, tmp_path, split: str, value: int):
    """A copy of `shards` whose first shard of `split` holds `value` in one mask pixel."""
    import shutil

    bad = tmp_path / f"bad-{split}"
    shutil.copytree(shards, bad)
    with h5py.File(bad / f"{split}-000.h5", "r+") as f:
        f["masks"][3, 10, 20] = value
    return bad


def test_shard_label_9_names_the_shard(shards, tmp_path):
    bad = _with_mask_value(shards, tmp_path, "train", 9)
    with pytest.raises(InputError, match=r"train-000\.h5: 'masks' has label value 9 in row 3"):
        load_split(bad, "train")
    bad = _with_mask_value(shards, tmp_path, "test", 9)
    with pytest.raises(InputError, match=r"test-000\.h5: 'masks' has label value 9 in row 3"):
        list(iter_batches(bad, "test", 2, with_masks=True))


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-mars" / "real_mars.npz"


@pytest.mark.skipif(not REAL.exists(), reason="real_mars.npz not present")
def test_real_mars(tmp_path):
    """Acceptance: the real file prepares into 2674 train and 515 labeled test images."""
    from marsseg.data import prepare

    info = prepare(REAL, tmp_path / "rm")
    assert info["splits"]["train"]["count"] == 2674
    assert info["splits"]["test"]["count"] == 515 and info["splits"]["test"]["labeled"]
    assert info["class_pixel_counts"]["train"] == [8739705, 4963731, 6624495, 1476909, 100568]
    assert info["cleaning"]["outlier_ids"] == []
    assert len(np.unique(load_split(tmp_path / "rm", "train").groups)) == 1377


def test_course_sized_outlier_group_flagged_exactly(tmp_path):
    """Acceptance: a synthetic file with 110 identical-mask outliers gets exactly those flagged."""
    from marsseg.data import prepare
    from marsseg.synth import write_synthetic

    arrays = write_synthetic(tmp_path / "s.npz", 220, 1, seed=11, n_outliers=110)
    planted = [i for i, s in enumerate(arrays["training_source"]) if "-alien-" in s]
    info = prepare(tmp_path / "s.npz", tmp_path / "shards")
    assert len(planted) == 110
    assert info["cleaning"]["outlier_ids"] == planted
    assert [g["count"] for g in info["cleaning"]["duplicate_mask_groups"]] == [110]


def test_corrupt_shard_is_an_input_error(shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    data = (bad / "train-001.h5").read_bytes()
    (bad / "train-001.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="train-001.h5"):
        load_split(bad, "train")
    with pytest.raises(InputError, match="train-001.h5"):
        list(iter_batches(bad, "train", 50))
