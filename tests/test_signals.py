"""SIGTERM (what `scancel`, `timeout` and `kill` send) takes Ctrl-C's path in every command:
temporary files are removed, the process says `terminated` and exits with 143, and a
rerun of train-folds resumes where the terminated one stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import typer
from _runfolder import make_npz, make_run
from typer.testing import CliRunner

from marsseg.cli import _app, app
from marsseg.cli._app import user_errors

RECIPE = """folds = 2
seed = 3
[[members]]
name = "a"
epochs = 6
batch_size = 16
[members.model]
name = "unet"
args = { base_width = 4, depth = 2 }
"""


def test_sigterm_during_predict_leaves_no_temp_files(tmp_path, real_cli):
    run = make_run(tmp_path / "run")
    npz = make_npz(tmp_path / "d.npz", n_train=2, n_test=2000)
    out = tmp_path / "out"
    out.mkdir()
    proc = real_cli.start(["predict", "--ensemble", run, "--data", npz, "--out", out / "s.csv",
                           "--probs", out / "p.h5", "--batch-size", "1", "--tta-vflip",
                           "--precision", "no", "-q"])
    tmps = [out / f"s.csv.tmp-{proc.pid}", out / f"p.h5.tmp-{proc.pid}"]
    real_cli.wait_for(proc, lambda: all(p.exists() for p in tmps), "the temp files appear")
    time.sleep(0.3)  # well inside the batch loop
    rc, err = real_cli.terminate(proc)
    assert rc == 143, err
    assert err.splitlines() == ["terminated"], err
    assert list(out.iterdir()) == []


class _TermInDel:
    """Sends this process SIGTERM from inside ``__del__``, where Python drops exceptions."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here; its Terminated is "ignored" by Python


def _run_on_for(seconds: float) -> None:
    """Ordinary code, where a redelivered SIGTERM raises: the redelivery's timer thread may
    wait for a core on a busy machine."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_landing_in_a_finalizer_still_terminates(capsys):
    # seen in CI once: the handler's Terminated raised inside a weakref callback was dropped
    # and predict ran to the end (exit 0); the unraisable hook delivers it again
    with pytest.raises(typer.Exit) as e, user_errors():
        _TermInDel()  # finalized at once
        _run_on_for(30)
    assert e.value.exit_code == 143
    assert capsys.readouterr().err.splitlines() == ["terminated"]


def test_redelivered_sigterm_that_lands_inside_the_hook_is_sent_again(capsys, monkeypatch):
    # seen on a loaded machine: the hook's timer thread fired before Timer.start() returned,
    # so the handler ran (and its Terminated was dropped) inside the unraisable hook itself
    fired = []

    class FiresAtOnce(threading.Timer):
        def start(self):
            if fired:
                return super().start()
            fired.append(1)
            self.function(*self.args)  # the signal arrives while start() still runs
            time.sleep(0.05)

    monkeypatch.setattr(_app.threading, "Timer", FiresAtOnce)
    with pytest.raises(typer.Exit) as e, user_errors():
        _TermInDel()
        _run_on_for(30)
    assert fired and e.value.exit_code == 143
    assert capsys.readouterr().err.splitlines() == ["terminated"]


def test_sigterm_during_train_folds_then_rerun_resumes(shards, tmp_path, real_cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    args = ["train-folds", "--data", str(shards), "--recipe", str(recipe), "--out", str(run),
            "--sequential", "--threads", "1", "--progress", "plain"]
    proc = real_cli.start(args)
    metrics = run / "a" / "fold_0" / "metrics.jsonl"
    # An epoch counts as kept once its state is saved (the metrics line is written just
    # before save_state; a kill between the two retrains that epoch, by design).
    state = run / "a" / "fold_0" / "state" / "trainer.json"
    real_cli.wait_for(proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 1
                      and state.exists(), "fold 0 finishes and saves an epoch")
    rc, err = real_cli.terminate(proc)
    assert rc == 143, err
    assert err.splitlines()[-1:] == ["terminated"] and "Traceback" not in err, err
    assert not (run / "a" / "fold_0" / "done.json").exists()
    # A state swap cut short leaves state.tmp-<pid>/, which the rerun removes; nothing else.
    left = [p.name for p in run.rglob("*.tmp-*")]
    assert left in ([], [f"state.tmp-{proc.pid}"]), left

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs = [r["epoch"] for r in rows]
    assert epochs == sorted(set(epochs)) and len(epochs) == 6, epochs
    assert rows[0]["worker"]["pid"] == proc.pid  # the first epoch was kept, not trained again
    assert any(r.get("resumed") for r in rows)
    assert all((run / "a" / f"fold_{k}" / "done.json").exists() for k in (0, 1))
    assert (run / "ensemble.json").exists()
    assert not list(Path(run).rglob("*.tmp-*"))


@pytest.mark.slow
def test_sigterm_during_train_folds_on_ray_exits_143_and_resumes(shards, tmp_path, real_cli):
    # ray.init puts its own SIGTERM handlers in the driver (Python's sys.exit and a C++
    # crash handler that dumps a stack and exits 1); the CLI's must win.
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace("epochs = 6", "epochs = 40"))
    run = tmp_path / "run"
    args = ["train-folds", "--data", str(shards), "--recipe", str(recipe), "--out", str(run),
            "--progress", "plain", "--folds", "0"]
    proc = real_cli.start(args)
    state = run / "a" / "fold_0" / "state" / "trainer.json"
    real_cli.wait_for(proc, state.exists, "fold 0 saves an epoch")
    rc, err = real_cli.terminate(proc)
    assert rc == 143, err
    assert err.splitlines()[-1:] == ["terminated"], err
    assert "SIGTERM received" not in err and "Traceback" not in err, err
    assert not (run / "a" / "fold_0" / "done.json").exists()
    res = CliRunner().invoke(app, args + ["--sequential", "--threads", "1"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "a" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(40)), [r["epoch"] for r in rows]
    assert any(r.get("resumed") for r in rows)  # continued, not started over


def test_sigterm_unwinds_through_finally_and_the_handler_is_restored(capsys):
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(typer.Exit) as e, user_errors():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
            raise AssertionError("SIGTERM did not interrupt")
        finally:
            cleaned.append(True)
    assert e.value.exit_code == 143 and cleaned == [True]
    assert capsys.readouterr().err == "terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_ray_drivers_sigterm_exit_takes_the_same_path(capsys):
    # ray.init replaces our handler in the driver with one that calls sys.exit(SIGTERM).
    with pytest.raises(typer.Exit) as e, user_errors():
        sys.exit(signal.SIGTERM)
    assert e.value.exit_code == 143
    assert capsys.readouterr().err == "terminated\n"
    with pytest.raises(SystemExit) as e2, user_errors():
        sys.exit(3)  # any other exit passes through untouched
    assert e2.value.code == 3


def test_sigterm_after_the_command_finished_still_says_terminated(tmp_path):
    """A SIGTERM that lands once a command's work is done (here at interpreter exit,
    after `select`-like output) is one line and exit 143, not a silent 143."""
    code = ("import atexit, os, signal, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)))\n"
            "import sys; sys.argv = ['marsseg-cli', '--version']\n"
            "from marsseg.cli import main; main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 143, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == ["terminated"], r.stderr
    assert r.stdout.startswith("marsseg-cli ")


def test_a_forked_child_does_not_inherit_the_commands_sigterm_handler():
    """A DataLoader worker or a library's helper forked while a command runs dies quietly on
    SIGTERM (default action) instead of raising Terminated with a traceback on stderr."""
    from marsseg.cli._app import _sigterm_raises

    with _sigterm_raises():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its handler, then wait to be terminated
            os.close(r)
            os.write(w, b"D" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else b"H")
            time.sleep(30)
            os._exit(0)
        os.close(w)
        seen = os.read(r, 1)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        os.close(r)
    assert seen == b"D"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
