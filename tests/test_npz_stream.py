"""The npz is streamed: headers first, then rows in chunks, stored or deflated alike."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from marsseg.data import as_batches, describe, load_npz, prepare, split_info
from marsseg.data.npz import NpzReader
from marsseg.errors import InputError


def _arrays(n_train=7, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n_train, 64, 128))
    mask = rng.integers(0, 5, (n_train, 64, 128))
    return {"training_set": np.stack([img, mask], 1).astype(np.uint8),
            "test_set": rng.integers(0, 256, (n_test, 64, 128)).astype(np.uint8),
            "test_masks": rng.integers(0, 5, (n_test, 64, 128)).astype(np.uint8)}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_chunks_give_the_same_rows_as_numpy(tmp_path, save):
    a = _arrays()
    a["training_set"] = a["training_set"].astype(np.float64)  # floats holding whole numbers
    a["test_masks"] = a["test_masks"].astype(">i2")  # another width and byte order
    save(tmp_path / "d.npz", **a)
    with NpzReader(tmp_path / "d.npz") as r:
        got = list(r.chunks("test", chunk_bytes=3 * 64 * 128 * 2))  # chunks of 3 rows
        assert [c[0] for c in got] == [0, 3]
        np.testing.assert_array_equal(np.concatenate([c[1] for c in got]), a["test_set"])
        np.testing.assert_array_equal(np.concatenate([c[2] for c in got]), a["test_masks"])
        train = list(r.chunks("train", chunk_bytes=1))  # one row per chunk
        assert len(train) == 7 and train[0][1].dtype == np.uint8
    d = load_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(d.train_masks, a["training_set"][:, 1])


def test_fortran_order_members_are_read_right(tmp_path):
    a = _arrays()
    a["test_set"] = np.asfortranarray(a["test_set"])
    np.savez(tmp_path / "f.npz", **a)
    ids, images = zip(*as_batches(tmp_path / "f.npz", "test", 2), strict=True)
    np.testing.assert_array_equal(np.concatenate(images), a["test_set"])
    assert np.concatenate(ids).tolist() == [0, 1, 2, 3, 4]


def _claim_rows(src, dst, key, rows):
    """Copy an npz with `key`'s header edited to claim `rows` rows (its data unchanged)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == key + ".npy":
                old = str(np.load(src)[key].shape[0])
                data = data.replace(f"'shape': ({old},".encode(), f"'shape': ({rows},".encode(), 1)
            zout.writestr(info.filename, data)
    return dst


def test_a_header_claiming_a_billion_rows_is_refused_before_reading(tmp_path):
    np.savez(tmp_path / "d.npz", **_arrays())
    bad = _claim_rows(tmp_path / "d.npz", tmp_path / "bad.npz", "training_set", 10**9)
    with pytest.raises(InputError, match=r"'training_set' is truncated or corrupt: its header "
                                         r"claims shape \(1000000000, 2, 64, 128\)"):
        split_info(bad, "train")
    with pytest.raises(InputError, match="truncated"):
        describe(bad)


def test_a_bad_value_names_its_row_across_chunks(tmp_path):
    a = _arrays()
    a["training_set"][5, 1, 3, 3] = 9
    np.savez(tmp_path / "d.npz", **a)
    with NpzReader(tmp_path / "d.npz") as r, \
            pytest.raises(InputError, match="label value 9 in row 5"):
        list(r.chunks("train", chunk_bytes=2 * 64 * 128 * 2))


def test_prepare_from_a_stream_equals_the_arrays(tmp_path):
    a = _arrays(n_train=11)
    np.savez_compressed(tmp_path / "d.npz", **a)
    prepare(tmp_path / "d.npz", tmp_path / "s", shard_size=4)
    ids, images, masks = zip(*as_batches(tmp_path / "s", "train", 5, with_masks=True),
                             strict=True)
    np.testing.assert_array_equal(np.concatenate(images), a["training_set"][:, 0])
    np.testing.assert_array_equal(np.concatenate(masks), a["training_set"][:, 1])
    assert sorted(p.name for p in (tmp_path / "s").glob("train-*.h5")) == [
        "train-000.h5", "train-001.h5", "train-002.h5"]
