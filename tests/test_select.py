"""Member selection by out-of-fold score: hand-made probabilities with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _runfolder import make_oof_run
from typer.testing import CliRunner

from marsseg.cli import app
from marsseg.select import select_members


def _complementary(n=4, h=4, w=8):
    """Two members each right on one class and wrong on the other; their average is perfect."""
    masks = np.ones((n, h, w), np.uint8)
    masks[:, :, w // 2:] = 2
    a = np.zeros((n, 5, h, w), np.float32)
    b = np.zeros((n, 5, h, w), np.float32)
    one, two = masks == 1, masks == 2
    a[:, 1][one], a[:, 2][one] = 0.9, 0.1
    a[:, 1][two], a[:, 2][two] = 0.6, 0.4
    b[:, 2][two], b[:, 1][two] = 0.9, 0.1
    b[:, 2][one], b[:, 1][one] = 0.6, 0.4
    return masks, a, b


def test_complementary_members_are_both_selected_with_equal_weight():
    masks, a, b = _complementary()
    sel = select_members({"a": a, "b": b}, masks)
    # Alone, each predicts one class everywhere: IoU 0.5 on it, 0 on the other -> 0.25.
    assert sel.single == pytest.approx({"a": 0.25, "b": 0.25})
    assert sel.oof_miou == pytest.approx(1.0)
    assert sel.weights == pytest.approx({"a": 0.5, "b": 0.5})
    assert [t["added"] for t in sel.trace] == ["a", "b"]


def test_a_useless_member_gets_no_weight():
    masks, a, _ = _complementary()
    perfect = np.zeros_like(a)
    for c in (1, 2):
        perfect[:, c][masks == c] = 1.0
    noise = np.random.default_rng(0).random(a.shape).astype(np.float32)
    sel = select_members({"perfect": perfect, "noise": noise}, masks)
    assert sel.weights == {"perfect": 1.0}
    assert sel.oof_miou == pytest.approx(1.0)


def _one_hot(masks):
    p = np.zeros((len(masks), 5, *masks.shape[1:]), np.float32)
    for c in range(1, 5):
        p[:, c][masks == c] = 1.0
    p[:, 1][masks == 0] = 1.0
    return p


def test_select_cli_writes_weights_into_ensemble_json(tmp_path, shards):
    rng = np.random.default_rng(1)
    make_oof_run(tmp_path, shards, {
        "oracle": lambda m, _: _one_hot(m),
        "noise": lambda m, _: rng.random((len(m), 5, *m.shape[1:])),
    })
    res = CliRunner().invoke(app, ["select", "--run", str(tmp_path)])
    assert res.exit_code == 0, res.output
    ens = json.loads((tmp_path / "ensemble.json").read_text())
    assert ens["selected"] == ["oracle"]
    weights = {m["name"]: m["weight"] for m in ens["members"]}
    assert weights == {"oracle": 1.0, "noise": 0.0}
    assert ens["selection"]["oof_miou"] == pytest.approx(1.0)


def test_select_cli_without_a_run_folder_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["select", "--run", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert f"{tmp_path / 'nope'}: run folder does not exist" in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
