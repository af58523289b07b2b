"""synth / prepare / inspect through the CLI: happy paths and every bad input.

Each bad input must end with exit code 2, one line on stderr naming the file and the
problem, no traceback, and nothing left at the output path.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from marsseg.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def small(n=6, m=3, seed=0):
    """A tiny valid file's arrays (random pixels, labels 0..4)."""
    rng = np.random.default_rng(seed)
    tr = np.stack(
        [rng.integers(0, 256, (n, 64, 128)), rng.integers(0, 5, (n, 64, 128))], axis=1
    ).astype(np.uint8)
    return {"training_set": tr, "test_set": rng.integers(0, 256, (m, 64, 128)).astype(np.uint8)}


def save(path, arrays):
    np.savez(path, **arrays)
    return path


def assert_user_error(res, path, *words):
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert str(path) in line, line
    for w in words:
        assert w.lower() in line.lower(), line


def assert_nothing_at(out):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


# ----------------------------------------------------------------------------- bad files


def _float_with(value, where):
    def make(a):
        tr = a["training_set"].astype(np.float32)
        tr[(2, where, 3, 4)] = value
        a["training_set"] = tr
        return a

    return make


def _set(key, fn):
    def make(a):
        a[key] = fn(a)
        return a

    return make


BAD_ARRAYS = {
    "missing training_set": (
        lambda a: {"test_set": a["test_set"]},
        ["missing key", "training_set"],
    ),
    "missing test_set": (
        lambda a: {"training_set": a["training_set"]},
        ["missing key", "test_set"],
    ),
    "training_set 3 channels": (
        _set("training_set", lambda a: np.zeros((6, 3, 64, 128), np.uint8)),
        ["training_set", "shape", "(6, 3, 64, 128)"],
    ),
    "training_set 3-d": (
        _set("training_set", lambda a: a["training_set"][:, 0]),
        ["training_set", "shape"],
    ),
    "images 64x64": (
        _set("training_set", lambda a: a["training_set"][..., :64]),
        ["training_set", "shape", "(6, 2, 64, 64)"],
    ),
    "test_set wrong shape": (
        _set("test_set", lambda a: a["test_set"][:, :32]),
        ["test_set", "shape"],
    ),
    "test_masks wrong shape": (
        _set("test_masks", lambda a: np.zeros((2, 64, 128), np.uint8)),
        ["test_masks", "shape"],
    ),
    "empty training_set": (
        _set("training_set", lambda a: np.zeros((0, 2, 64, 128), np.uint8)),
        ["training_set", "no images"],
    ),
    "label 7": (
        _set(
            "training_set",
            lambda a: np.where(np.arange(2)[None, :, None, None] == 1, 7, a["training_set"]).astype(
                np.uint8
            ),
        ),
        ["training_set", "label value 7", "0..4"],
    ),
    "test_masks label 5": (
        _set("test_masks", lambda a: np.full((3, 64, 128), 5, np.uint8)),
        ["test_masks", "label value 5"],
    ),
    "NaN in images": (_float_with(np.nan, 0), ["training_set", "NaN"]),
    "NaN in masks": (_float_with(np.nan, 1), ["training_set", "NaN"]),
    "non-integer label": (_float_with(1.5, 1), ["training_set", "non-integer", "1.5"]),
    "non-integer pixel": (_float_with(12.25, 0), ["training_set", "non-integer", "12.25"]),
    "pixel 300": (
        _set(
            "training_set",
            lambda a: (
                a["training_set"].astype(np.int16)
                + np.int16(300) * (np.arange(2)[None, :, None, None] == 0)
            ),
        ),
        ["training_set", "pixel value", "0..255"],
    ),
    "negative pixel": (
        _set("test_set", lambda a: a["test_set"].astype(np.int16) - 300),
        ["test_set", "pixel value", "0..255"],
    ),
    "string dtype": (
        _set("training_set", lambda a: a["training_set"].astype(str)),
        ["training_set", "dtype"],
    ),
    "training_source wrong length": (
        _set("training_source", lambda a: np.array(["a#0", "b#1"])),
        ["training_source", "shape"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_prepare_rejects_bad_arrays(case, tmp_path):
    make, words = BAD_ARRAYS[case]
    src = save(tmp_path / "bad.npz", make(small()))
    out = tmp_path / "out"
    assert_user_error(run("prepare", "--data", src, "--out", out), src, *words)
    assert_nothing_at(out)


def test_prepare_rejects_object_array(tmp_path):
    a = small()
    a["training_set"] = np.array([a["training_set"][0], None], dtype=object)
    src = tmp_path / "obj.npz"
    np.savez(src, **a)  # saving object arrays pickles them; loading must not unpickle
    out = tmp_path / "out"
    assert_user_error(run("prepare", "--data", src, "--out", out), src, "pickle")
    assert_nothing_at(out)


def test_prepare_missing_file(tmp_path):
    src, out = tmp_path / "nope.npz", tmp_path / "out"
    assert_user_error(run("prepare", "--data", src, "--out", out), src, "no such file")
    assert_nothing_at(out)


def test_prepare_not_an_npz(tmp_path):
    src, out = tmp_path / "notes.npz", tmp_path / "out"
    src.write_text("hello, I am text\n")
    assert_user_error(run("prepare", "--data", src, "--out", out), src, "not an npz")
    assert_nothing_at(out)


def test_prepare_npy_instead_of_npz(tmp_path):
    src, out = tmp_path / "arr.npy", tmp_path / "out"
    np.save(src, small()["training_set"])
    assert_user_error(run("prepare", "--data", src, "--out", out), src, ".npy")
    assert_nothing_at(out)


def test_prepare_directory_as_input(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("prepare", "--data", tmp_path, "--out", out), tmp_path, "directory")
    assert_nothing_at(out)


def test_prepare_truncated_npz(tmp_path):
    src, out = save(tmp_path / "t.npz", small()), tmp_path / "out"
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    assert_user_error(run("prepare", "--data", src, "--out", out), src, "truncated")
    assert_nothing_at(out)


def test_prepare_corrupt_member(tmp_path):
    src, out = save(tmp_path / "c.npz", small()), tmp_path / "out"
    data = bytearray(src.read_bytes())
    mid = len(data) // 4  # inside training_set's bytes: the zip directory is intact
    data[mid : mid + 64] = bytes(64)
    src.write_bytes(bytes(data))
    assert_user_error(run("prepare", "--data", src, "--out", out), src, "corrupt")
    assert_nothing_at(out)


def test_prepare_output_exists(tmp_path):
    src = save(tmp_path / "ok.npz", small())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run("prepare", "--data", src, "--out", out), out, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_prepare_force_refuses_foreign_folder(tmp_path):
    src = save(tmp_path / "ok.npz", small())
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert_user_error(run("prepare", "--data", src, "--out", out, "--force"), out, "dataset.json")
    assert (out / "thesis.tex").read_text() == "precious"


def test_prepare_output_is_a_file(tmp_path):
    src = save(tmp_path / "ok.npz", small())
    out = tmp_path / "out"
    out.write_text("x")
    assert_user_error(run("prepare", "--data", src, "--out", out, "--force"), out, "not a directory")
    assert out.read_text() == "x"


@pytest.mark.parametrize("size", ["0", "-3"])
def test_prepare_shard_size_zero(tmp_path, size):
    src = save(tmp_path / "ok.npz", small())
    out = tmp_path / "out"
    res = run("prepare", "--data", src, "--out", out, "--shard-size", size)
    assert_user_error(res, out, "--shard-size", "at least 1")
    assert_nothing_at(out)


def test_prepare_bad_max_background(tmp_path):
    src = save(tmp_path / "ok.npz", small())
    out = tmp_path / "out"
    assert_user_error(run("prepare", "--data", src, "--out", out, "--max-background", "1.5"), out, "--max-background")
    assert_nothing_at(out)


# ----------------------------------------------------------------------------- happy paths


def test_synth_prepare_inspect(tmp_path):
    npz, out = tmp_path / "s.npz", tmp_path / "shards"
    res = run("synth", "--out", npz, "--n-train", 60, "--n-test", 10, "--seed", 3, "--n-outliers", 11)
    assert res.exit_code == 0, res.output
    assert "60 train (11 outliers" in res.stdout
    res = run("prepare", "--data", npz, "--out", out, "--shard-size", 25)
    assert res.exit_code == 0, res.output
    assert "flagged 11 duplicate-mask outliers" in res.stdout
    info = json.loads((out / "dataset.json").read_text())
    assert [s["count"] for s in info["splits"]["train"]["shards"]] == [25, 25, 10]
    assert_nothing_at(tmp_path / "gone")  # helper sanity: no stray temp dirs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards.")]

    for data in (out, npz):
        res = run("inspect", "--data", data)
        assert res.exit_code == 0, res.output
        for word in (
            "Class pixel shares",
            "Big Rock",
            "train clean",
            "11 images share one mask",
            "0.9-1.0",
        ):
            assert word in res.stdout, (word, res.stdout)

    res = run("inspect", "--data", out, "--json", "--max-background", "0.5")
    d = json.loads(res.stdout)
    assert d["counts"]["outliers"] == 11 and d["max_background"] == 0.5


def test_prepare_force_replaces(tmp_path):
    npz = save(tmp_path / "a.npz", small(n=6))
    out = tmp_path / "shards"
    assert run("prepare", "--data", npz, "--out", out).exit_code == 0
    npz2 = save(tmp_path / "b.npz", small(n=9, seed=1))
    res = run("prepare", "--data", npz2, "--out", out, "--force")
    assert res.exit_code == 0, res.output
    info = json.loads((out / "dataset.json").read_text())
    assert info["splits"]["train"]["count"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "shards"]


def test_prepare_failure_keeps_old_folder(tmp_path, monkeypatch):
    npz = save(tmp_path / "a.npz", small(n=6))
    out = tmp_path / "shards"
    assert run("prepare", "--data", npz, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import marsseg.data.shards as shards
    from marsseg.errors import InputError

    def boom(*a, **k):
        raise InputError("disk full (simulated)")

    monkeypatch.setattr(shards, "write_shard", boom)
    res = run("prepare", "--data", npz, "--out", out, "--force")
    assert res.exit_code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "shards"]


def test_prepare_interrupted_leaves_nothing(tmp_path, monkeypatch):
    npz = save(tmp_path / "a.npz", small(n=6))
    out = tmp_path / "shards"
    import marsseg.data.shards as shards

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "write_shard", interrupt)
    res = run("prepare", "--data", npz, "--out", out)
    assert res.exit_code == 130
    assert_nothing_at(out)


def test_prepare_accepts_float_whole_numbers(tmp_path):
    a = small()
    ints = save(tmp_path / "int.npz", a)
    floats = save(tmp_path / "float.npz", {k: v.astype(np.float64) for k, v in a.items()})
    assert run("prepare", "--data", ints, "--out", tmp_path / "i").exit_code == 0
    res = run("prepare", "--data", floats, "--out", tmp_path / "f")
    assert res.exit_code == 0, res.output
    import h5py

    with (
        h5py.File(tmp_path / "i" / "train-000.h5") as fi,
        h5py.File(tmp_path / "f" / "train-000.h5") as ff,
    ):
        for k in ("images", "masks"):
            assert fi[k].dtype == np.uint8 and np.array_equal(fi[k][()], ff[k][()])


# ----------------------------------------------------------------------------- synth, inspect errors


def test_synth_bad_arguments(tmp_path):
    res = run("synth", "--out", tmp_path / "s.npz", "--n-train", 0)
    assert res.exit_code == 2 and "--n-train" in res.stderr and "Traceback" not in res.output
    res = run("synth", "--out", tmp_path / "s.npz", "--n-train", 20, "--n-outliers", 30)
    assert res.exit_code == 2 and "--n-outliers" in res.stderr
    assert_user_error(run("synth", "--out", tmp_path, "--n-train", 5), tmp_path, "directory")
    assert os.listdir(tmp_path) == []


def test_inspect_bad_inputs(tmp_path):
    assert_user_error(run("inspect", "--data", tmp_path / "none.npz"), tmp_path / "none.npz", "no such")
    (tmp_path / "x.npz").write_text("text")
    assert_user_error(run("inspect", "--data", tmp_path / "x.npz"), tmp_path / "x.npz", "not an npz")
    empty = tmp_path / "folder"
    empty.mkdir()
    assert_user_error(run("inspect", "--data", empty), empty, "dataset.json")


def test_prepare_unwritable_destination(tmp_path):
    src = save(tmp_path / "ok.npz", small())
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "shards"
    assert_user_error(run("prepare", "--data", src, "--out", out), out, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "ok.npz"]
    res = run("synth", "--out", blocker / "s.npz", "--n-train", 3)
    assert_user_error(res, blocker / "s.npz", "cannot write")


def test_prepare_force_refuses_to_delete_its_source(tmp_path):
    npz = save(tmp_path / "a.npz", small())
    out = tmp_path / "shards"
    assert run("prepare", "--data", npz, "--out", out).exit_code == 0
    inner = save(out / "copy.npz", small())
    assert_user_error(run("prepare", "--data", inner, "--out", out, "--force"), inner, "inside")
    assert inner.exists() and (out / "dataset.json").exists()


# ----------------------------------------------------------------------------- path convention


def test_old_positional_paths_still_work_and_match_the_options(tmp_path):
    """`synth OUT`, `prepare IN OUT`, `inspect DATA` (the old form) = the --out/--data form."""
    assert run("synth", "--out", tmp_path / "a.npz", "--n-train", 8, "--n-test", 2).exit_code == 0
    assert run("synth", tmp_path / "b.npz", "--n-train", 8, "--n-test", 2).exit_code == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert run("prepare", "--data", tmp_path / "a.npz", "--out", tmp_path / "sa").exit_code == 0
    assert run("prepare", tmp_path / "a.npz", tmp_path / "sb").exit_code == 0
    for name in ("train-000.h5", "test-000.h5"):
        assert (tmp_path / "sa" / name).read_bytes() == (tmp_path / "sb" / name).read_bytes()
    a, b = run("inspect", "--data", tmp_path / "sa", "--json"), run("inspect", tmp_path / "sa", "--json")
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("argv, words", [
    (["synth", "--n-train", "8"], ["Missing option '--out'"]),
    (["prepare", "--data", "{tmp}/a.npz"], ["Missing option '--out'"]),
    (["inspect"], ["Missing option '--data'"]),
    (["synth", "{tmp}/a.npz", "--out", "{tmp}/b.npz"], ["--out given twice", "{tmp}/a.npz"]),
])
def test_path_missing_or_given_twice_is_one_usage_line(tmp_path, argv, words):
    res = run(*[a.format(tmp=tmp_path) for a in argv])
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"error: marsseg-cli {argv[0]}: ")
    assert all(w.format(tmp=tmp_path) in line for w in words), line
    assert os.listdir(tmp_path) == []


def test_list_options_one_parser():
    from marsseg.cli._options import parse_list
    from marsseg.errors import InputError

    assert parse_list(None, "--folds", int) is None
    assert parse_list(["0,2", " 3 "], "--folds", int) == (0, 2, 3)
    assert parse_list(["a,b", "c"], "--members") == ("a", "b", "c")
    with pytest.raises(InputError, match="--folds: expected a comma-separated list of numbers"):
        parse_list(["0,x"], "--folds", int)
    with pytest.raises(InputError, match="--members: empty list"):
        parse_list([" , "], "--members")
