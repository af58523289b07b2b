"""--time-budget: durations, the epoch arithmetic, the decision recorded once per fold and
reused on resume, the schedule built on the decided count, and CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_budget import DEMO
from test_train import Interrupt, metrics, stop_after, tiny_recipe
from typer.testing import CliRunner

from marsseg import budget
from marsseg.budget import epochs_for_budget, parse_duration
from marsseg.cli import app
from marsseg.errors import InputError
from marsseg.optim import lr_at
from marsseg.train import train_one_fold


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("12m", 720), ("1.5h", 5400), (" 2 m ", 120),
                                          (".5m", 30)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["12", "12 min", "m", "0s", "-1m", "1.5x", "", "1e3s"])
def test_parse_duration_rejects(text):
    with pytest.raises(InputError, match="--time-budget.*90s, 12m, 1.5h"):
        parse_duration(text)


def test_epochs_for_budget():
    # one epoch = 10 steps x 0.5 s + 1 s validation + 1 s checkpoint = 7 s; 100 - 4 s probe
    kw = dict(probe_s=4.0, train_step_s=0.5, steps_per_epoch=10, val_s=1.0, checkpoint_s=1.0)
    assert epochs_for_budget(100.0, **kw) == 13
    assert epochs_for_budget(11.0, **kw) == 1
    assert epochs_for_budget(3.0, **kw) == 1  # too small for one epoch: still train one


def test_fit_member_keeps_a_decaying_schedule():
    m = tiny_recipe(schedule={"name": "cosine", "warmup_epochs": 2}).members[0]
    assert budget.fit_member(m, 5).epochs == 5 and budget.fit_member(m, 5).schedule == m.schedule
    short = budget.fit_member(m, 2)
    assert short.epochs == 2 and short.schedule.warmup_epochs == 1
    assert budget.fit_member(m, 1).schedule.warmup_epochs == 0
    assert lr_at(short.schedule, 1.0, 2 * 10 - 1, 10, 2) < 0.05  # 10 steps/epoch: decayed


def fake_probe(train_step_s: float):
    """A probe that measures nothing: makes the decided count independent of this machine."""
    def probe(*args, **kw):
        return {"train_step_s": train_step_s, "val_s": 0.0, "checkpoint_s": 0.0, "probe_s": 0.0}
    return probe


def test_decided_epochs_are_recorded_and_reused_on_resume(shards, tmp_path, monkeypatch):
    r = tiny_recipe(epochs=50, schedule={"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.1})
    d = tmp_path / "tiny" / "fold_0"
    monkeypatch.setattr(budget, "probe", fake_probe(1.0))
    events = []

    def progress(ev):
        events.append(ev)
        stop_after(0)(ev)

    with pytest.raises(Interrupt):
        train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, precision="no",
                       time_budget=30.0, progress=progress)
    record = json.loads((d / "budget.json").read_text())
    spe = record["steps_per_epoch"]
    epochs = 30 // spe  # 1 s per step, nothing else: whole epochs of `spe` seconds in 30 s
    assert record["epochs"] == epochs >= 3 and record["time_budget_s"] == 30.0
    assert events[0].event == "start" and events[0].epochs == epochs

    def no_probe(*a, **kw):
        raise AssertionError("a resumed fold must not measure again")

    monkeypatch.setattr(budget, "probe", no_probe)
    with pytest.raises(InputError, match="--time-budget 30s"):
        train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, precision="no", time_budget=60.0)
    with pytest.raises(InputError, match="same budget"):
        train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, precision="no")
    done = train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, precision="no", time_budget=30.0)
    rows = metrics(d)
    assert [x["epoch"] for x in rows] == list(range(epochs)) and rows[1].get("resumed") is True
    assert done.epochs == done.epochs_run == epochs
    # the cosine schedule was built on the decided count: its last step is at the low end
    sched = r.members[0].schedule
    for e, row in enumerate(rows):
        assert row["lr"] == pytest.approx(lr_at(sched, 1e-3, (e + 1) * spe - 1, spe, epochs))
    lo = 1e-3 * 0.1
    assert rows[-1]["lr"] - lo < 0.05 * (1e-3 - lo)


def test_a_fold_started_without_a_budget_is_not_given_one(shards, tmp_path):
    r = tiny_recipe(epochs=3)
    with pytest.raises(Interrupt):
        train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, progress=stop_after(0))
    with pytest.raises(InputError, match="without --time-budget"):
        train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, time_budget=60.0)


@pytest.mark.parametrize("text", ["{", '{"time_budget_s": 60}', '{"time_budget_s": "1m", "epochs": 3}',
                                  '{"time_budget_s": 60, "epochs": 0}', "[]"])
def test_a_damaged_budget_record_is_one_line_naming_it(tmp_path, text):
    (tmp_path / "budget.json").write_text(text)
    with pytest.raises(InputError) as e:
        budget.decide_epochs(tmp_path, 60.0, has_state=False, measure=dict, steps_per_epoch=1)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'budget.json'}: ") and "\n" not in msg
    assert "delete" in msg


def test_probe_leaves_no_trace(shards, tmp_path):
    """The real probe trains a few steps and puts everything back: the fold's weights equal
    those of a fold trained with --epochs <decided count> and no probe."""
    r = tiny_recipe(epochs=50, schedule={"name": "cosine", "warmup_epochs": 0})
    kw = dict(threads=1, precision="no")
    timed = train_one_fold(r, "tiny", 0, shards, tmp_path / "a", time_budget=3.0, **kw)
    record = json.loads((tmp_path / "a" / "tiny" / "fold_0" / "budget.json").read_text())
    assert set(record["measured"]) == {"train_step_s", "val_s", "checkpoint_s", "probe_s"}
    assert record["measured"]["train_step_s"] > 0 and timed.epochs == record["epochs"]
    assert not list((tmp_path / "a" / "tiny" / "fold_0").glob("budget-probe*"))
    plain = train_one_fold(tiny_recipe(epochs=record["epochs"], schedule={"name": "cosine"}),
                           "tiny", 0, shards, tmp_path / "b", **kw)
    a = load_file(str(tmp_path / "a" / "tiny" / "fold_0" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "tiny" / "fold_0" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert timed.val_miou == plain.val_miou


def test_cli_time_budget_errors_and_pin(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["train-folds", "--data", str(shards), "--recipe", str(DEMO), "--out", str(run),
            "--sequential", "--folds", "0", "--progress", "none"]
    for extra, words in ((["--time-budget", "12"], "unit s, m or h"),
                         (["--time-budget", "2m", "--epochs", "3"], "give one of them")):
        res = CliRunner().invoke(app, [*args, *extra])
        assert res.exit_code == 2 and words in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not run.exists()
    monkeypatch.setattr(budget, "probe", fake_probe(100.0))  # one epoch fits in 1 min
    res = CliRunner().invoke(app, [*args, "--time-budget", "1m"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "overrides.json").read_text()) == {"time_budget_s": 60.0}
    assert len(metrics(run / "unet-se" / "fold_0")) == 1
    ens = json.loads((run / "ensemble.json").read_text())
    assert ens["members"][0]["folds"][0]["epochs"] == 1
    assert CliRunner().invoke(app, [*args, "--time-budget", "60s"]).exit_code == 0  # same budget
    for extra in (["--time-budget", "2m"], []):
        res = CliRunner().invoke(app, [*args, *extra])
        assert res.exit_code == 2 and "--time-budget" in res.output, res.output
