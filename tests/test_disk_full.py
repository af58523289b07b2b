"""A full disk anywhere is one line naming the path ("no space left on device"), exit 2, and
nothing new left behind (issue 19, items 8, 9 and 11). Each case runs on a small tmpfs, so
it needs root (CI is); elsewhere it is skipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _runfolder import make_npz, make_run
from typer.testing import CliRunner

from marsseg.cli import app
from marsseg.data import prepare
from marsseg.errors import InputError
from marsseg.runfolder import write_oof

runner = CliRunner()

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounting a small tmpfs needs root")

RECIPE = """folds = 2
seed = 1
[[members]]
name = "a"
epochs = 1
batch_size = 4
[members.model]
name = "unet"
args = { base_width = 4, depth = 2 }
"""


@pytest.fixture
def disk(tmp_path):
    """disk(size) -> a fresh tmpfs folder of that size ("300k"), unmounted afterwards."""
    mounted: list[Path] = []

    def make(size: str, fill: bool = False) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(d)
        if fill:  # every block taken: the next byte written fails
            with open(d / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("diskfull")
    npz = make_npz(base / "d.npz", n_train=8, n_test=11, test_masks=True)
    prepare(npz, base / "shards", shard_size=4)
    run = make_run(base / "run", members=("a",), k=2, metrics=True)
    folds = [{"fold": 0, "val_ids": [0, 1, 2, 3], "train_ids": [4, 5, 6, 7]},
             {"fold": 1, "val_ids": [4, 5, 6, 7], "train_ids": [0, 1, 2, 3]}]
    (run / "splits.json").write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))
    (base / "tiny.toml").write_text(RECIPE)
    return {"npz": npz, "shards": base / "shards", "run": run, "recipe": base / "tiny.toml",
            "base": base}


def one_line(r, *names):
    out = r.stderr if isinstance(r, subprocess.CompletedProcess) else r.stderr
    code = r.returncode if isinstance(r, subprocess.CompletedProcess) else r.exit_code
    assert code == 2, (code, out)
    assert "Traceback" not in out
    (line,) = out.strip().splitlines()
    assert "no space left on device" in line, line
    for n in names:
        assert str(n) in line, line


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != "filler")


@pytest.mark.slow  # a real process (a crash at exit shows only there)
def test_predict_probs_on_a_full_disk_leaves_neither_file(world, disk, real_cli):
    """Item 8: the CSV was renamed into --out, then a traceback and a segfault (139)."""
    d = disk("600k")  # the CSV (~180 kB) fits, the probabilities (~1 MB) do not
    r = real_cli.run(["predict", "--ensemble", world["run"], "--data", world["shards"], "--out",
                      d / "s.csv", "--probs", d / "p.h5", "--backend", "eager", "--quiet"])
    one_line(r, d / "p.h5")
    assert _entries(d) == []


def test_predict_csv_on_a_full_disk(world, disk):
    d = disk("64k")
    r = runner.invoke(app, ["predict", "--ensemble", str(world["run"]), "--data",
                            str(world["shards"]), "--out", str(d / "s.csv"), "--backend",
                            "eager", "--quiet"])
    one_line(r, d / "s.csv")
    assert _entries(d) == []


def test_oof_cut_short_is_never_renamed_into_place(disk):
    """Item 9: a half-written oof.h5 (its last image all 0.0) was renamed into place."""
    d = disk("200k")
    probs = np.random.default_rng(0).random((4, 5, 64, 128)).astype(np.float16)  # 320 kB
    with pytest.raises(InputError, match="no space left on device|does not read back"):
        write_oof(d / "oof.h5", np.arange(4), probs)
    assert _entries(d) == []


@pytest.mark.slow  # a real process (a crash at exit shows only there)
def test_train_folds_on_a_full_disk_leaves_no_run_folder(world, disk, real_cli):
    """Item 11: a traceback in the lock's pwrite, and newrun/.lock left behind."""
    d = disk("256k", fill=True)
    r = real_cli.run(["train-folds", "--data", world["shards"], "--recipe", world["recipe"],
                      "--out", d / "newrun", "--sequential", "--progress", "none"])
    one_line(r)
    assert _entries(d) == []


@pytest.mark.slow  # a real process (a crash at exit shows only there)
def test_train_folds_whose_disk_fills_while_training(world, disk, real_cli):
    """The disk fills while folds train (weights, state, oof.h5): one line, exit 2, and
    no half-written file under its final name."""
    d = disk("400k")
    r = real_cli.run(["train-folds", "--data", world["shards"], "--recipe", world["recipe"],
                      "--out", d / "run", "--sequential", "--progress", "none"])
    one_line(r)
    for oof in d.rglob("oof.h5"):  # any oof.h5 there is whole
        import h5py

        with h5py.File(oof) as f:
            assert f["probs"].shape[0] == 4 and np.asarray(f["probs"][-1]).any()
    assert not list(d.rglob("*.tmp-*"))


@pytest.mark.parametrize("command", ["evaluate", "select"])
def test_run_folder_commands_on_a_full_disk(world, disk, command):
    """Item 11: the lock's os.pwrite raised a traceback in evaluate and select."""
    d = disk("2m")
    run = d / "run"
    shutil.copytree(world["run"], run)
    before = (run / "ensemble.json").read_bytes()
    with open(d / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    (run / ".lock").unlink(missing_ok=True)
    args = {"evaluate": ["evaluate", "--ensemble", run, "--data", world["shards"], "--backend",
                         "eager", "--quiet", "--split", "test"],
            "select": ["select", "--run", run, "--data", world["shards"]]}[command]
    r = runner.invoke(app, [str(a) for a in args])
    if command == "select" and r.exit_code == 2 and "sha256" in r.stderr:
        pytest.skip("the world run has no train OOF files for select")
    one_line(r)
    assert (run / "ensemble.json").read_bytes() == before
    assert not (run / "scores.json").exists()


def test_report_on_a_full_disk_leaves_no_empty_folder(world, disk):
    d = disk("32k")
    r = runner.invoke(app, ["report", "--ensemble", str(world["run"]), "--out", str(d / "rep")])
    one_line(r, d / "rep")
    assert _entries(d) == []


def test_prepare_and_synth_on_a_full_disk(world, disk):
    d = disk("64k")
    r = runner.invoke(app, ["prepare", "--data", str(world["npz"]), "--out", str(d / "sh")])
    one_line(r, d / "sh")
    r = runner.invoke(app, ["synth", "--out", str(d / "s.npz"), "--n-train", "50"])
    one_line(r, d / "s.npz")
    assert _entries(d) == []
