"""Resources and contracts (issue 19): the static batch follows the image count, shard
folders are pinned while read, prepare --force through a symlink, cluster addresses
checked up front, int8 calibration on few images, AOTInductor loads leave no temp files."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from _runfolder import make_npz, make_run

from marsseg import backends as B
from marsseg import quantize as Q
from marsseg.cluster import check_address
from marsseg.data import as_batches, prepare
from marsseg.errors import InputError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("resources")
    w = {"dir": d}
    w["a"] = make_npz(d / "a.npz", n_train=8, n_test=12, test_masks=True, seed=1)
    w["b"] = make_npz(d / "b.npz", n_train=8, n_test=12, test_masks=True, seed=2)
    w["run"] = make_run(d / "run", members=("a",), k=1)
    return w


# ----------------------------------------------------------------------------- static batch


def test_static_batch_is_the_batch_size_or_a_power_of_two_for_fewer_images():
    assert B.static_batch(64) == 64 and B.static_batch(64, 1000) == 64
    assert [B.static_batch(64, n) for n in (0, 1, 2, 3, 5, 8, 9, 33, 64)] == [
        1, 1, 2, 4, 8, 8, 16, 64, 64]
    assert B.static_batch(5000, 8) == 8  # the 23 GB repro: 8 images never build 5,000
    assert B.static_batch(48, 40) == 48  # never above the batch size


def test_openvino_converts_for_the_images_there_are(world, tmp_path):
    pytest.importorskip("openvino")
    from marsseg.predict import predict

    run = make_run(tmp_path / "r", members=("a",), k=1)
    predict(run, world["a"], tmp_path / "s.csv", backend="openvino", batch_size=1000,
            precision="no")
    caches = [p.name for p in (run / "a" / "fold_0" / "cache").glob("*.xml")]
    assert len(caches) == 1 and "-b32." in caches[0], caches  # 12 images -> 16, x 2 views


# ----------------------------------------------------------------------------- pinned shards

_SLOW_READER = r"""
import sys, time, pathlib
from marsseg.predict import predict
run, data, out, marker = sys.argv[1:5]
def slow(r):
    pathlib.Path(marker).touch()
    time.sleep(0.5)
predict(run, data, out, batch_size=2, backend="eager", precision="no", tta=False, on_batch=slow)
"""


def test_prepare_force_is_refused_while_predict_reads_the_folder(world, tmp_path):
    shards = tmp_path / "shards"
    prepare(world["a"], shards, shard_size=4)
    expected = tmp_path / "expected.csv"
    from marsseg.predict import predict

    predict(world["run"], shards, expected, batch_size=2, backend="eager", precision="no",
            tta=False)
    marker = tmp_path / "reading"
    reader = subprocess.Popen([sys.executable, "-c", _SLOW_READER, str(world["run"]),
                               str(shards), str(tmp_path / "got.csv"), str(marker)],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists() and reader.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), reader.stderr.read() if reader.poll() is not None else "slow"
        with pytest.raises(InputError, match="is being read by a running command"):
            prepare(world["b"], shards, shard_size=4, force=True)
        assert reader.wait(300) == 0, reader.stderr.read()
    finally:
        if reader.poll() is None:
            reader.kill()
    assert (tmp_path / "got.csv").read_text() == expected.read_text()  # never a mixed CSV
    prepare(world["b"], shards, shard_size=4, force=True)  # the reader is gone: allowed
    assert json.loads((shards / "dataset.json").read_text())["source"]["path"].endswith("b.npz")


def test_a_folder_swapped_mid_read_is_detected(world, tmp_path):
    shards, other = tmp_path / "shards", tmp_path / "other"
    prepare(world["a"], shards, shard_size=4)
    prepare(world["b"], other, shard_size=4)
    batches = as_batches(shards, "test", 4)
    next(batches)
    os.rename(shards, tmp_path / "aside")  # what prepare --force does, were it not refused
    os.rename(other, shards)
    with pytest.raises(InputError, match="was replaced while being read"):
        list(batches)


def test_prepare_force_through_a_symlink_keeps_the_link(world, tmp_path):
    target = tmp_path / "real"
    prepare(world["a"], target, shard_size=4)
    link = tmp_path / "link"
    link.symlink_to(target)
    prepare(world["b"], link, shard_size=4, force=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads((target / "dataset.json").read_text())["source"]["path"].endswith("b.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .old-<pid>


# ----------------------------------------------------------------------------- addresses


def test_cluster_addresses_are_checked_before_anything_starts():
    check_address(None)
    check_address("auto")
    with pytest.raises(InputError, match="--address garbage:1: unknown host 'garbage'"):
        check_address("garbage:1")
    with pytest.raises(InputError, match="expected host:port"):
        check_address("head:port")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match="no Ray cluster answers there"):
        check_address(f"127.0.0.1:{port}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_address(f"ray://127.0.0.1:{s.getsockname()[1]}")


# ----------------------------------------------------------------------------- int8, compile


def test_int8_calibration_on_few_images_says_so_and_repeats_them():
    assert Q.calibration_note(256, 64) is None
    note = Q.calibration_note(1, 64)
    assert "1 real image(s), 256 wanted" in note and "repeated" in note
    images = np.arange(3, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    (batch,) = Q.calib_batches(images, 8, ((), (-1,)), 16)
    assert batch.shape == (16, 1, 4, 4)
    assert sorted({int(v) for v in batch[:, 0, 0, 0]}) == [0, 1, 2]  # no zero pads beyond


def test_a_failed_compiled_load_leaves_no_temp_folder(tmp_path):
    before = set(glob.glob("/tmp/aotinductor_*")) | set(glob.glob("/tmp/marsseg-pt2-*"))
    bad = tmp_path / "x.pt2"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x/archive_format", "pt2")
        z.writestr("x/data/aotinductor/model/model.so", b"not a library")
        z.writestr("x/data/aotinductor/model/model_metadata.json", b"{}")
    with pytest.raises(Exception):  # noqa: B017 - torch's own error; prepare() words it
        B._load_compiled(bad.read_bytes())
    after = set(glob.glob("/tmp/aotinductor_*")) | set(glob.glob("/tmp/marsseg-pt2-*"))
    assert after <= before


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs (root only, as in CI), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_conversion_on_a_full_disk_says_so(world, small_disk, tmp_path):
    pytest.importorskip("openvino")
    from typer.testing import CliRunner

    from marsseg.cli import app

    run = make_run(small_disk / "run", members=("a",), k=1)
    try:
        with open(small_disk / "filler", "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
    except OSError:
        pass
    r = CliRunner().invoke(app, ["predict", "--ensemble", str(run), "--data", str(world["a"]),
                                 "--out", str(tmp_path / "s.csv"), "--backend", "openvino"])
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.splitlines()
    assert "no space left on device" in line and "openvino" in line, line
    assert "basic_ios" not in line and not (run / "a" / "fold_0" / "cache").exists()
    assert not (tmp_path / "s.csv").exists()
