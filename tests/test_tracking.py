"""train-folds --log-with: accelerate's trackers with the real TensorBoard and MLflow (read back
with TensorBoard's event reader and mlflow.search_runs), a resumed fold continuing its own
tracked run, select / evaluate scores in the group, and the checks before training starts."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marsseg.cli import app
from marsseg.config import load_recipe
from marsseg.errors import InputError
from marsseg.orchestrate import RunOptions, train_folds
from marsseg.runfolder import data_fingerprint
from marsseg.tracking import (
    TRACKING,
    check_trackers,
    epoch_values,
    fold_config,
    open_group,
)
from marsseg.train import train_one_fold

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]

RECIPE = """folds = 2
seed = 5
[[members]]
name = "a"
epochs = 2
batch_size = 16
[members.model]
name = "unet"
args = { base_width = 4, depth = 2 }
[members.filters]
skip_outliers = true
"""
SCALARS = {"train/loss", "val/miou", "lr", "img_s", "threads", "epoch_seconds",
           "val/iou/1_soil", "val/iou/2_bedrock", "val/iou/3_sand"}


@pytest.fixture
def local_store(monkeypatch):
    """MLflow's default store in the run folder, nothing sent anywhere."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def test_check_trackers_keeps_order_drops_repeats_and_names_unknown():
    assert check_trackers(["TensorBoard", "mlflow", "tensorboard"]) == ("tensorboard", "mlflow")
    assert check_trackers(()) == ()
    with pytest.raises(InputError, match="unknown tracker 'tensorbored'.*tensorboard, mlflow"):
        check_trackers(["tensorbored"])


def test_missing_tracker_package_names_the_extra():
    # python -S: no site-packages, so neither tensorboard nor mlflow can be found
    code = ("from marsseg.tracking import check_trackers\n"
            "for t in ('mlflow', 'tensorboard', 'wandb'):\n"
            "    try:\n        check_trackers([t])\n    except Exception as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == ["--log-with mlflow: the mlflow package is not installed; "
                   "pip install 'marsseg[track]'",
                   "--log-with tensorboard: the tensorboard package is not installed; "
                   "pip install 'marsseg[track]'",
                   "--log-with wandb: the wandb package is not installed; pip install wandb"]


@pytest.mark.skipif(importlib.util.find_spec("aim") is not None, reason="aim is installed")
def test_cli_missing_tracker_exits_2_before_anything_is_written(shards, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    res = runner.invoke(app, ["train-folds", "--data", str(shards), "--recipe",
                              str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"),
                              "--log-with", "tensorboard,aim"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: --log-with aim: the aim package is not installed; " \
                                 "pip install aim"
    assert not (tmp_path / "run").exists()


def test_epoch_values_are_the_metrics_line():
    row = {"epoch": 3, "loss": 0.5, "val_miou": 0.4, "val_iou": [None, 0.1, 0.2, 0.3, None],
           "lr": 1e-3, "img_s": 50.0, "seconds": 2.0, "threads": 2, "time": 1.0}
    assert epoch_values(row) == {"train/loss": 0.5, "val/miou": 0.4, "lr": 1e-3, "img_s": 50.0,
                                 "threads": 2, "epoch_seconds": 2.0, "val/iou/1_soil": 0.1,
                                 "val/iou/2_bedrock": 0.2, "val/iou/3_sand": 0.3}


class Stop(Exception):
    pass


def _stop_after_first_epoch(ev):
    if ev.event == "epoch":  # its state and its tracked epoch are saved by now
        raise Stop


def _tensorboard_runs(tb: Path) -> dict:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(tb))
    mux.Reload()
    return {run: mux.GetAccumulator(run) for run, tags in mux.Runs().items() if tags["scalars"]}


@pytest.mark.slow
def test_two_folds_tracked_in_tensorboard_and_mlflow_and_a_resumed_fold_continues(
        shards, tmp_path, local_store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from marsseg.evaluate import evaluate
    from marsseg.inference import PredictConfig
    from marsseg.select import select_run

    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(RECIPE)
    out = tmp_path / "grp"
    opts = RunOptions(sequential=True, threads=1, progress="none",
                      log_with=("tensorboard", "mlflow"))
    train_folds(recipe_path, shards, out, dataclasses.replace(opts, folds=(1,)))
    # fold 0 stops after epoch 0, as a killed fold would, then the whole run is run again
    recipe = load_recipe(recipe_path)
    spec = open_group(out, opts.log_with, opts.resources(), data_fingerprint(shards))
    with pytest.raises(Stop):
        train_one_fold(recipe, "a", 0, shards, out, threads=1, tracking=spec,
                       progress=_stop_after_first_epoch)
    first_id = json.loads((out / "a/fold_0" / TRACKING).read_text())["mlflow_run_id"]
    mlflow.set_tracking_uri(spec.mlflow_uri)
    assert MlflowClient().get_run(first_id).info.status == "KILLED"
    ens = train_folds(recipe_path, shards, out, opts)
    assert ens["trained"] == ["a/fold_0"]

    # TensorBoard: one run per fold under RUN/tb, every epoch's scalars once, hparams in it
    runs = _tensorboard_runs(out / "tb")
    assert sorted(runs) == ["a/fold_0", "a/fold_1"]
    for acc in runs.values():
        assert SCALARS <= set(acc.Tags()["scalars"])
        for tag in SCALARS:
            assert [e.step for e in acc.Scalars(tag)] == [0, 1], tag
    metrics = [json.loads(x) for x in (out / "a/fold_0/metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in runs["a/fold_0"].Scalars("val/miou")] == \
        pytest.approx([r["val_miou"] for r in metrics])

    # MLflow: two fold runs under the run folder's parent run; the resumed fold kept its id
    group = json.loads((out / TRACKING).read_text())["mlflow"]
    assert group["uri"] is None  # the default store: RUN/mlflow.db
    assert spec.mlflow_uri == f"sqlite:///{(out / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(spec.mlflow_uri)
    folds = mlflow.search_runs(experiment_names=["marsseg"], output_format="list",
                               filter_string=f"tags.`mlflow.parentRunId` = '{group['parent_run_id']}'")
    assert sorted(r.info.run_name for r in folds) == ["a/fold_0", "a/fold_1"]
    assert all(r.data.tags["marsseg.group"] == "grp" for r in folds)
    assert len(mlflow.search_runs(experiment_names=["marsseg"], output_format="list")) == 3
    by_name = {r.info.run_name: r for r in folds}
    assert by_name["a/fold_0"].info.run_id == first_id
    assert {r.info.status for r in folds} == {"FINISHED"}
    client = MlflowClient(spec.mlflow_uri)
    for r in folds:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/miou")] == [0, 1]
    member = recipe.member("a")
    for fold, r in ((0, by_name["a/fold_0"]), (1, by_name["a/fold_1"])):
        params = r.data.params
        assert params["epochs"] == "2" and params["seed"] == "5" and params["fold"] == str(fold)
        assert params["member.model.args.base_width"] == "4"
        assert params["member.optimizer.lr"] == str(member.optimizer.lr)
        assert params["data.dataset_sha256"] == \
            hashlib.sha256((shards / "dataset.json").read_bytes()).hexdigest()
        assert params["precision"] == "bf16" and params["resources.threads"] == "1"
        assert params == {k: str(v) for k, v in fold_config(
            spec, recipe, member, fold, "bf16", "cpu", 1).items()}

    # select and evaluate log the ensemble's scores to the group
    sel = select_run(out)
    res = evaluate(out, shards, cfg=PredictConfig(tta=False, batch_size=16), split="test")
    parent = client.get_run(group["parent_run_id"]).data.metrics
    assert parent["select/oof_miou"] == pytest.approx(sel.oof_miou)
    ens_row = next(r for r in res["rows"] if r["kind"] == "ensemble")
    assert parent["test/ensemble/miou"] == pytest.approx(ens_row["miou"])
    ens_tb = _tensorboard_runs(out / "tb")["ensemble"]
    assert {"select/oof_miou", "test/ensemble/miou"} <= set(ens_tb.Tags()["scalars"])


def test_wandb_offline_groups_fold_runs(shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "r.toml").write_text(RECIPE.replace("epochs = 2", "epochs = 1"))
    out = tmp_path / "w"
    train_folds(tmp_path / "r.toml", shards, out,
                RunOptions(sequential=True, threads=1, progress="none", folds=(0,),
                           log_with=("wandb",)))
    wid = json.loads((out / "a/fold_0" / TRACKING).read_text())["wandb_id"]
    assert list((out / "wandb").glob(f"offline-run-*-{wid}"))


def test_without_log_with_nothing_is_tracked(shards, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE.replace("epochs = 2", "epochs = 1"))
    out = tmp_path / "plain"
    train_folds(tmp_path / "r.toml", shards, out,
                RunOptions(sequential=True, threads=1, progress="none", folds=(0,)))
    assert not list(out.rglob(TRACKING)) and not (out / "tb").exists()
    assert not (out / "mlflow.db").exists()
