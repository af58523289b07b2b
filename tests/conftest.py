"""Shared fixtures: one small synthetic npz and its prepared shard folder per test session.

Teammates reuse these (`synth_npz`, `shards`); both are read-only for tests, so copy
before modifying.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from marsseg.data import prepare
from marsseg.synth import write_synthetic

# trackers in tests (test_tracking): local stores only, nothing sent anywhere
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_MODE", "offline")

SYNTH_N_TRAIN = 160
SYNTH_N_TEST = 40
SYNTH_N_OUTLIERS = 12
SYNTH_SEED = 7


@pytest.fixture(scope="session")
def synth_npz(tmp_path_factory):
    """Path to a synthetic npz: 160 train (12 identical-mask outliers), 40 test with masks."""
    path = tmp_path_factory.mktemp("synth") / "synth.npz"
    write_synthetic(path, SYNTH_N_TRAIN, SYNTH_N_TEST, seed=SYNTH_SEED, n_outliers=SYNTH_N_OUTLIERS)
    return path


@pytest.fixture(scope="session")
def shards(synth_npz, tmp_path_factory):
    """Prepared shard folder of `synth_npz` (shard size 64, so train spans 3 files)."""
    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(synth_npz, out, shard_size=64)
    return out


@pytest.fixture(scope="session")
def synth_arrays(synth_npz):
    """The raw arrays of `synth_npz` as a dict."""
    with np.load(synth_npz) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def ray_start_fails(monkeypatch):
    """ray.init raises what Ray raises when a local node times out on a loaded machine;
    this process looks as if it joined no Ray, and nothing real is shut down."""
    ray = pytest.importorskip("ray")
    calls = []

    def init(*args, **kwargs):
        calls.append(kwargs.get("address"))
        raise Exception("The current node timed out during startup. This could happen because "
                        "some of the raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    return calls
