"""train-folds when Ray stops a fold's worker or the progress actor from outside (its
memory monitor, a crash): the run retries and finishes, or ends with one line saying
what happened and that a rerun resumes. The kills are simulated (no memory pressure)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from marsseg import orchestrate as O
from marsseg import raytrain
from marsseg.cli import app

runner = CliRunner()

RECIPE = """folds = 2
seed = 3
[[members]]
name = "a"
epochs = 1
batch_size = 16
[members.model]
name = "unet"
args = { base_width = 4, depth = 2 }
"""




def test_the_line_for_a_fold_lost_to_the_memory_monitor():
    ray = pytest.importorskip("ray")
    err = O.lost_fold(ray.exceptions.OutOfMemoryError("Task was killed due to the node "
                                                      "running low on memory.\nMemory on the "
                                                      "node was 23 GB"), "a", 1, "/runs/x")
    line = str(err)
    assert "\n" not in line and line.startswith("a/fold_1: Ray's memory monitor killed")
    assert "run the same command again to resume" in line and "/runs/x" in line
    other = str(O.lost_fold(ray.exceptions.WorkerCrashedError(), "a", 0, "/r"))
    assert other.startswith("a/fold_0: its worker died (WorkerCrashedError")


def _cli(shards, recipe, out):
    return ["train-folds", "--data", str(shards), "--recipe", str(recipe), "--out", str(out),
            "--folds", "0", "--threads", "1", "--progress", "plain"]


def test_a_fold_whose_worker_dies_for_good_is_one_line_and_a_rerun_resumes(
        shards, tmp_path, local_ray, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"

    def dies(*args):  # what the memory monitor's SIGKILL does to a worker
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(raytrain, "fold_task", dies)
    res = runner.invoke(app, _cli(shards, recipe, out) + ["--max-retries", "0"])
    assert res.exit_code == 1, (res.output, res.exception)
    assert "Traceback" not in res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith("error: a/fold_0: its worker died") and "again to resume" in line
    assert not (out / "ensemble.json").exists()

    monkeypatch.undo()
    res = runner.invoke(app, _cli(shards, recipe, out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert (out / "ensemble.json").exists()


def test_a_killed_progress_actor_does_not_end_the_run(shards, tmp_path, local_ray, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"

    def kill_board_then_train(recipe, member, fold, data, out, kwargs, threads, board, cpus):
        import ray

        from marsseg.raytrain import fold_task  # the real one (a fresh import here)

        ray.kill(board, no_restart=True)
        return fold_task(recipe, member, fold, data, out, kwargs, threads, None, cpus)

    monkeypatch.setattr(raytrain, "fold_task", kill_board_then_train)
    res = runner.invoke(app, _cli(shards, recipe, out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert "progress view lost" in res.output and "Traceback" not in res.output
    assert (out / "ensemble.json").exists()
