"""Resolve once, open once, hash once: what one predict --tta / evaluate --tta decides,
counted with sys.setprofile (aliases and function-local imports cannot hide a call)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from _runfolder import TINY_RECIPE, make_npz, make_run
from typer.testing import CliRunner

from marsseg import _io, backends, device
from marsseg.cli import app
from marsseg.data import prepare, shards

runner = CliRunner()


def _watched() -> dict:
    return {device.resolve_device.__code__: "device resolved",
            device.resolve_precision.__code__: "precision resolved",
            backends.resolve.__code__: "backend resolved",
            shards.read_dataset.__code__: "dataset.json parsed",
            _io.sha256_file.__code__: "hashed"}


def count_calls(fn, *args, **kwargs) -> Counter:
    """Run fn and count the calls of the watched functions (weights: sha256 of a
    model.safetensors)."""
    watched, counts = _watched(), Counter()

    def profile(frame, event, arg):
        if event != "call" or frame.f_code not in watched:
            return
        what = watched[frame.f_code]
        if what == "hashed":
            if Path(frame.f_locals.get("path", "")).name != "model.safetensors":
                return
            what = "weights hashed"
        counts[what] += 1

    sys.setprofile(profile)
    try:
        fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return counts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("once")
    npz = make_npz(d / "d.npz", n_train=6, n_test=9, test_masks=True)
    prepare(npz, d / "shards", shard_size=4)
    return {"run": make_run(d / "run", members=("a", "b"), k=2), "shards": d / "shards", "d": d}


def _cli(*args) -> None:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output


def test_the_counter_sees_aliased_calls():
    from marsseg.device import resolve as aliased

    assert count_calls(aliased, "cpu", "no") == {"device resolved": 1, "precision resolved": 1}


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_predict_decides_everything_once(world, backend):
    counts = count_calls(_cli, "predict", "--ensemble", world["run"], "--data", world["shards"],
                         "--out", world["d"] / f"s-{backend}.csv", "--tta", "--batch-size", "4",
                         "--backend", backend, "--quiet")
    # one resolution, one dataset.json, each of the 4 fold weights hashed once
    assert counts == {"device resolved": 1, "precision resolved": 1, "backend resolved": 1,
                      "dataset.json parsed": 1, "weights hashed": 4}


def test_evaluate_decides_everything_once(world):
    counts = count_calls(_cli, "evaluate", "--ensemble", world["run"], "--data", world["shards"],
                         "--tta", "--batch-size", "4", "--backend", "eager", "--quiet")
    assert counts == {"device resolved": 1, "precision resolved": 1, "backend resolved": 1,
                      "dataset.json parsed": 1, "weights hashed": 4}


# ----------------------------------------------------------------------------- the auto rule


@pytest.mark.parametrize("cuda, cuda_bf16, cpu_bf16, want", [
    (True, True, False, ("cuda", "bf16")),
    (True, False, True, ("cuda", "fp16")),
    (False, False, True, ("cpu", "bf16")),
    (False, False, False, ("cpu", "no")),
])
def test_auto_precision_rule(monkeypatch, cuda, cuda_bf16, cpu_bf16, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device, "cuda_bf16", lambda: cuda_bf16)
    monkeypatch.setattr(device, "cpu_bf16_fast", lambda: cpu_bf16)
    rt = device.resolve(None, "auto")
    assert (rt.device.type, rt.precision) == want
    # an explicit precision is taken as it is; fp16 only on CUDA
    assert device.resolve("cpu", "bf16").precision == "bf16"
    assert device.resolve_training("auto", None).precision == want[1]


def test_training_resolution_follows_the_task_resources(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_bf16_fast", lambda: False)
    assert device.resolve_training("auto", 0.0) == device.Resolved(torch.device("cpu"), "no")
    # a task GPU the driver cannot see: fp16, which every CUDA GPU runs
    assert device.resolve_training("auto", 1.0) == device.Resolved(torch.device("cuda"), "fp16")
    with pytest.raises(device.InputError, match="GPU-only.*--gpus-per-task"):
        device.resolve_training("fp16", 0.0)
    with pytest.raises(device.InputError, match="GPU-only"):
        device.resolve("cpu", "fp16")
    with pytest.raises(device.InputError, match="unknown value"):
        device.resolve("cpu", "fp8")




def test_train_folds_decides_everything_once(world):
    recipe = world["d"] / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    ours = str(Path(device.__file__).parent)
    cuda = Counter()  # torch.cuda.is_available() asked by marsseg (accelerate asks on its own)

    def train():
        def probe(frame, event, arg):
            if (event == "call" and frame.f_code is torch.cuda.is_available.__code__
                    and frame.f_back.f_code.co_filename.startswith(ours)):
                cuda["CUDA queried"] += 1
        inner = sys.getprofile()
        sys.setprofile(lambda *a: (inner(*a), probe(*a)))
        try:
            _cli("train-folds", "--data", world["shards"], "--recipe", recipe,
                 "--out", world["d"] / "trained", "--sequential", "--progress", "none")
        finally:
            sys.setprofile(inner)

    counts = count_calls(train)
    # device and precision decided once by the driver (each fold takes its decision),
    # dataset.json read once, each fold's weights hashed once (when it finishes)
    assert counts == {"device resolved": 1, "precision resolved": 1, "dataset.json parsed": 1,
                      "weights hashed": 2}
    assert cuda == {"CUDA queried": 1}
