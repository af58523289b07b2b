"""TrainerState: state/trainer.json keeps its keys, and run folders written before it resume."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train import Interrupt, metrics, stop_after, tiny_recipe

from marsseg.checkpoint import TrainerState
from marsseg.errors import InputError
from marsseg.train import train_one_fold

# state/trainer.json exactly as train_one_fold wrote it before TrainerState existed
OLD = """{
  "epoch": 1,
  "best_miou": 0.0998519653546988,
  "best_epoch": 0,
  "bad_epochs": 1,
  "plateau_bad": 1,
  "plateau_scale": 1.0,
  "step": 6,
  "train_seconds": 0.5312197109997214,
  "stopped_early": false
}
"""


def test_round_trip_keeps_keys_order_and_values():
    old = json.loads(OLD)
    state = TrainerState.from_json(old)
    assert state.best_miou == pytest.approx(0.0998519653546988) and state.step == 6
    assert json.dumps(state.to_json(), indent=2) + "\n" == OLD
    s = TrainerState(epoch=4, best_miou=-1.0, best_epoch=2, bad_epochs=2, plateau_bad=0,
                     plateau_scale=0.25, step=40, train_seconds=12.5, stopped_early=True)
    assert TrainerState.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert TrainerState.from_json({"epoch": -1}) == TrainerState()


def test_missing_keys_take_defaults_unknown_keys_are_ignored():
    s = TrainerState.from_json({"epoch": 2, "best_miou": None, "best_epoch": -1, "step": 9,
                                "from_a_later_version": [1, 2]})
    assert s == TrainerState(epoch=2, step=9)
    assert TrainerState.from_json({"epoch": 0, "plateau_scale": 1}).plateau_scale == 1.0


@pytest.mark.parametrize("key,value", [("epoch", "1"), ("best_miou", "high"), ("step", 1.5),
                                       ("stopped_early", 0), ("bad_epochs", True)])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        TrainerState.from_json({"epoch": 0, key: value})


def test_a_fold_saved_by_an_older_version_resumes_to_the_same_weights(shards, tmp_path):
    r = tiny_recipe(epochs=3)
    with pytest.raises(Interrupt):
        train_one_fold(r, "tiny", 0, shards, tmp_path / "a", threads=1, precision="no",
                       progress=stop_after(0))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    # b: an older trainer.json, without the keys added later and with one since dropped
    path_b = tmp_path / "b" / "tiny" / "fold_0" / "state" / "trainer.json"
    saved = json.loads(path_b.read_text())
    older = {k: saved[k] for k in ("epoch", "best_miou", "best_epoch", "bad_epochs", "step")}
    path_b.write_text(json.dumps({**older, "no_longer_used": 1}))
    # c: a value of the wrong type
    path_c = tmp_path / "c" / "tiny" / "fold_0" / "state" / "trainer.json"
    path_c.write_text(json.dumps({**saved, "best_epoch": "zero"}))

    a = train_one_fold(r, "tiny", 0, shards, tmp_path / "a", threads=1, precision="no")
    b = train_one_fold(r, "tiny", 0, shards, tmp_path / "b", threads=1, precision="no")
    assert b.sha256 == a.sha256 and b.epochs_run == 3
    # only the first epoch after the restart is marked
    assert [x.get("resumed", False) for x in metrics(path_b.parent.parent)] == [False, True, False]
    assert list(json.loads(path_b.read_text())) == list(json.loads(OLD))  # rewritten in full

    with pytest.raises(InputError, match="trainer.json.*best_epoch.*delete"):
        train_one_fold(r, "tiny", 0, shards, tmp_path / "c", threads=1, precision="no")
    assert not (path_c.parent.parent / "done.json").exists()
