"""Shared fixtures: one small synthetic npz and its prepared shard folder per test session
(`synth_npz`, `shards`; both read-only for tests, so copy before modifying), marsseg-cli in
a real process (`real_cli`), an embedded Ray (`local_ray`) and a Ray that fails to start
(`ray_start_fails`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from marsseg.data import prepare
from marsseg.synth import write_synthetic

# trackers in tests (test_tracking): local stores only, nothing sent anywhere
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Ray in tests (in this process or a CLI subprocess) runs without token authentication
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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


class RealCli:
    """marsseg-cli in a real process (``python -m marsseg.cli``), not CliRunner: signals,
    exit codes and a crash at interpreter exit (a segfault, 139) show only there."""

    command = (sys.executable, "-m", "marsseg.cli")

    def _kw(self, kw: dict) -> dict:
        return {"text": True, "env": {**os.environ, "RAY_AUTH_MODE": "disabled"}, **kw}

    def run(self, args, **kw) -> subprocess.CompletedProcess:
        """Run to the end; stdout and stderr captured as text."""
        return subprocess.run([*self.command, *map(str, args)],
                              **self._kw({"capture_output": True, **kw}))

    def start(self, args, **kw) -> subprocess.Popen:
        """Start it; stdout and stderr are text pipes unless ``kw`` says otherwise."""
        return subprocess.Popen([*self.command, *map(str, args)],
                                **self._kw({"stdout": subprocess.PIPE,
                                            "stderr": subprocess.PIPE, **kw}))

    @staticmethod
    def wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 180.0) -> None:
        """Poll ``cond()`` until true; fail (with its stderr) if ``proc`` ends first, and
        kill it after ``timeout`` seconds."""
        t = time.monotonic()
        while not cond():
            if proc.poll() is not None:
                raise AssertionError(f"finished (rc {proc.returncode}) before {what}: "
                                     f"{proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() - t > timeout:
                proc.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    @staticmethod
    def terminate(proc: subprocess.Popen) -> tuple[int, str]:
        """SIGTERM (what scancel, timeout and kill send); its exit code and stderr."""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err


@pytest.fixture(scope="session")
def real_cli() -> RealCli:
    """marsseg-cli in a real process: ``real_cli.run(args)``, ``real_cli.start(args)``."""
    return RealCli()


@pytest.fixture(scope="module")
def local_ray():
    """The private embedded Ray train-folds starts; one another module started is reused
    and left running."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    from marsseg.cluster import start_ray

    start_ray()
    yield ray
    ray.shutdown()
