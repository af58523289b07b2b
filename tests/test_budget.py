"""--epochs: a training budget that overrides every member's epochs and is pinned to the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marsseg.cli import app
from marsseg.config import load_recipe, with_epochs
from marsseg.errors import InputError

DEMO = Path(__file__).resolve().parents[1] / "ensembles" / "demo.toml"


def test_with_epochs_replaces_every_member_and_nothing_else():
    recipe = load_recipe(DEMO)
    short = with_epochs(recipe, 1)
    assert [m.epochs for m in short.members] == [1] * len(recipe.members)
    assert [m.model for m in short.members] == [m.model for m in recipe.members]
    assert with_epochs(recipe, None) is recipe
    with pytest.raises(InputError, match="--epochs"):
        with_epochs(recipe, 0)


def test_epochs_budget_is_used_and_pinned(tmp_path, shards):
    run = tmp_path / "run"
    args = ["train-folds", "--data", str(shards), "--recipe", str(DEMO), "--out", str(run),
            "--sequential", "--folds", "0", "--progress", "none"]
    res = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert res.exit_code == 0, res.output
    lines = (run / "unet-se" / "fold_0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads((run / "overrides.json").read_text()) == {"epochs": 1}
    # Same budget again: nothing to do. Another budget: refused in one line.
    assert CliRunner().invoke(app, [*args, "--epochs", "1"]).exit_code == 0
    res = CliRunner().invoke(app, [*args, "--epochs", "2"])
    assert res.exit_code == 2
    assert "--epochs" in res.output and "Traceback" not in res.output
