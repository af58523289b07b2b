"""Records that cross modules: done.json, ensemble.json, progress events, the predict summary,
the cache key.

Each record's `to_json` gives exactly the dict written before the record existed (the golden
texts below were written by train_one_fold at cf13962, before `records.Done`), `from_json`
reads older files (keys they lack take defaults) and names the file and key of a wrong type.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from _runfolder import make_run

from marsseg._progress import EVENT_KEYS, Event, ProgressView
from marsseg.errors import InputError
from marsseg.predict import PredictSummary
from marsseg.records import Done, EnsembleSpec, FoldSpec, MemberSpec
from marsseg.runfolder import CACHE_NAME_RE, RunFolder, cache_key, read_done, verify_fold_folder

# done.json of a plain fold and of a sampled one, as train_one_fold wrote them before `Done`
OLD_DONE = """{
  "member": "a",
  "fold": 0,
  "recipe": "r",
  "best_epoch": 0,
  "val_miou": 0.093466,
  "val_iou": [
    null,
    0.0,
    0.373866,
    0.0,
    0.0
  ],
  "epochs": 1,
  "epochs_run": 1,
  "stopped_early": false,
  "n_train": 12,
  "n_train_filtered": 0,
  "n_val": 12,
  "n_pseudo": 0,
  "precision": "no",
  "device": "cpu",
  "train_seconds": 0.524,
  "sha256": "b61879b734952229a848d6f3b4edff67b8a6d8dab68cf3205935fa77f582fce9",
  "seconds_this_attempt": 7.768
}
"""
OLD_DONE_SAMPLED = """{
  "member": "s",
  "fold": 1,
  "recipe": "r",
  "best_epoch": 0,
  "val_miou": 0.000429,
  "val_iou": [
    null,
    0.0,
    0.0,
    0.0,
    0.001715
  ],
  "epochs": 1,
  "epochs_run": 1,
  "stopped_early": false,
  "n_train": 12,
  "n_train_filtered": 0,
  "n_val": 12,
  "n_pseudo": 0,
  "precision": "no",
  "device": "cpu",
  "train_seconds": 0.219,
  "sha256": "0ab2622149711d0c40a5952f7676886c7afb3a4ad56e035fe47486e545aff90d",
  "seconds_this_attempt": 0.571,
  "sampling": {
    "rare_class": 4,
    "factor": 3.0,
    "min_pixels": 1,
    "n_train_rare": 2
  }
}
"""


def _text(d: dict) -> str:
    return json.dumps(d, indent=2, allow_nan=False) + "\n"  # as _io.write_json_atomic writes


@pytest.mark.parametrize("old", [OLD_DONE, OLD_DONE_SAMPLED], ids=["plain", "sampled"])
def test_done_round_trip_is_byte_identical(old):
    done = Done.from_json(json.loads(old), "done.json")
    assert _text(done.to_json()) == old
    assert done.val_iou == (None, 0.0, *json.loads(old)["val_iou"][2:])
    assert Done.from_json(done.to_json(), "done.json") == done


def test_done_written_by_a_fold_reads_back(shards, tmp_path):
    """train_one_fold's own done.json: the record it returns is the one on disk, byte for byte."""
    from test_train import tiny_recipe

    from marsseg.train import train_one_fold

    done = train_one_fold(tiny_recipe(epochs=1), "tiny", 0, shards, tmp_path, threads=1,
                          precision="no")
    path = tmp_path / "tiny" / "fold_0" / "done.json"
    text = path.read_text()
    assert list(json.loads(text)) == list(json.loads(OLD_DONE))  # the keys, in their order
    assert _text(done.to_json()) == text
    assert read_done(path.parent, "tiny/fold_0") == done == RunFolder(tmp_path).verify_fold("tiny", 0)
    assert done.workers == 1 and done.sampling is None and done.n_val > 0


def test_done_optional_keys_where_they_always_were():
    base = Done.from_json(json.loads(OLD_DONE_SAMPLED), "done.json")
    keys = list(dataclasses.replace(base, workers=2).to_json())
    assert keys[keys.index("device") + 1] == "workers" and keys[-1] == "sampling"
    plain = list(dataclasses.replace(base, sampling=None).to_json())
    assert "workers" not in plain and "sampling" not in plain


def test_older_done_files_load_with_defaults(tmp_path):
    run = make_run(tmp_path / "run", members=("a",), k=1)  # its done.json: only "sha256"
    done = RunFolder(run).verify_fold("a", 0)
    assert done.sha256 and done.n_pseudo == 0 and done.workers == 1 and done.val_miou is None
    old = {k: v for k, v in json.loads(OLD_DONE).items() if k not in ("n_pseudo", "n_train_filtered")}
    assert Done.from_json({**old, "future_key": [1]}, "done.json").n_pseudo == 0  # unknown: ignored


@pytest.mark.parametrize("key,value", [("val_miou", "high"), ("epochs", 1.5), ("fold", None),
                                       ("stopped_early", 0), ("sampling", [1]), ("n_val", True),
                                       ("val_iou", ["x"])])
def test_done_wrong_type_names_file_and_key(tmp_path, key, value):
    run = make_run(tmp_path / "run", members=("a",), k=1)
    path = run / "a" / "fold_0" / "done.json"
    d = json.loads(OLD_DONE)
    d["sha256"] = json.loads(path.read_text())["sha256"]
    path.write_text(json.dumps({**d, key: value}))
    with pytest.raises(InputError, match=rf"{path}: malformed done file \('{key}'.*delete"):
        verify_fold_folder(path.parent, "a/fold_0")


def test_done_without_sha256_names_it(tmp_path):
    path = tmp_path / "done.json"
    path.write_text(json.dumps({"member": "a"}))
    with pytest.raises(InputError, match=r"done.json: malformed done file \(no 'sha256'\)"):
        read_done(tmp_path, "a/fold_0")


# --------------------------------------------------------------------------- progress events

# the dicts Report sent before `Event`: the common keys, then the kind's, in this order
OLD_EVENTS = [
    {"event": "start", "member": "a", "fold": 0, "epochs": 3, "pid": 7, "time": 1.5, "epoch": 1,
     "resumed_from": 0, "n_train": 12, "n_pseudo": 0, "n_val": 4, "precision": "no",
     "device": "cpu"},
    {"event": "start", "member": "a", "fold": "all", "epochs": 3, "pid": 7, "time": 1.5,
     "epoch": 0, "resumed_from": None, "n_train": 16, "n_pseudo": 0, "n_val": 0, "precision": "bf16",
     "device": "cpu"},
    {"event": "batch", "member": "a", "fold": 0, "epochs": 3, "pid": 7, "time": 2.0, "epoch": 1,
     "batch": 2, "batches": 5, "img_s": 40.5},
    {"event": "epoch", "member": "a", "fold": 0, "epochs": 3, "pid": 7, "time": 3.0, "epoch": 1,
     "loss": 0.7, "val_miou": 0.4, "best_miou": 0.4, "img_s": 41.0, "seconds": 1.25},
    {"event": "done", "member": "a", "fold": 0, "epochs": 3, "pid": 7, "time": 4.0, "epoch": 2,
     "val_miou": None},
]


@pytest.mark.parametrize("old", OLD_EVENTS, ids=[e["event"] for e in OLD_EVENTS])
def test_event_round_trip_keeps_keys_and_order(old):
    ev = Event.from_json(old)
    assert list(ev.to_json().items()) == list(old.items())
    assert set(EVENT_KEYS) == {"start", "batch", "epoch", "done"}


@pytest.mark.parametrize("bad,match", [({"event": "nope"}, "not a progress event"),
                                       ({**OLD_EVENTS[2], "batch": "2"}, "'batch'"),
                                       ({**OLD_EVENTS[2], "colour": 1}, "'colour'"),
                                       ({**OLD_EVENTS[0], "fold": True}, "'fold'")])
def test_event_wrong_type_names_key(bad, match):
    with pytest.raises(ValueError, match=match):
        Event.from_json(bad)


def test_progress_view_takes_events(capsys):
    from rich.console import Console

    view = ProgressView([("a", 0, 3)], mode="plain", console=Console(width=200))
    view.update([Event.from_json(e) for e in OLD_EVENTS if e["fold"] == 0])
    out = capsys.readouterr().out
    assert "a fold 0: start (12 train / 4 val images, no on cpu, pid 7) resumed after epoch 0" in out
    assert "a fold 0: epoch 2/3 loss 0.7000 val mIoU 40.00 (best 40.00) 41 img/s" in out
    assert view.rows[("a", 0)].status == "done"
    # a --teacher fold says how many pseudo-labelled test images joined its training part
    view = ProgressView([("a", 1, 3)], mode="plain", console=Console(width=200))
    view.update([Event.from_json({**OLD_EVENTS[0], "fold": 1, "n_pseudo": 5})])
    assert "a fold 1: start (12 train + 5 pseudo-labelled / 4 val images," in capsys.readouterr().out


# --------------------------------------------------------------------------- predict summary

OLD_SUMMARY = {"rows": 6, "seconds": 1.234, "setup_seconds": 0.5, "images_per_s": 12.0,
               "models": ["a/fold_0", "a/fold_1"], "views": 2, "precision": "no",
               "backend": "eager", "device": "cpu", "csv": "s.csv", "probs": None}


def test_predict_summary_round_trip_and_types():
    s = PredictSummary.from_json(OLD_SUMMARY)
    assert list(s.to_json().items()) == list(OLD_SUMMARY.items())
    assert s.models == ("a/fold_0", "a/fold_1") and s.images_per_s == 12.0
    with pytest.raises(InputError, match="summary: malformed summary \\('rows'"):
        PredictSummary.from_json({**OLD_SUMMARY, "rows": "6"}, "summary")
    with pytest.raises(InputError, match="no 'csv'"):
        PredictSummary.from_json({k: v for k, v in OLD_SUMMARY.items() if k != "csv"})


# --------------------------------------------------------------------------- the cache key


def test_cache_key_format_is_the_run_folders():
    sha = "0123456789abcdef" * 4
    key = cache_key(Path("run/a/fold_0"), "openvino-int8", "no", sha, 8)
    assert key == Path("run/a/fold_0/cache/openvino-int8-f32-0123456789abcdef-b8")
    compiled = cache_key(Path("f"), "compile", "bf16", sha, 64, "2.5.1+cpu")
    assert compiled.name == "compile-bf16-0123456789abcdef-b64-torch2_5_1"
    for k in (key, compiled):
        m = CACHE_NAME_RE.fullmatch(k.name + ".json")
        assert m and m["sha"] == sha[:16] and m["pid"] is None
    assert CACHE_NAME_RE.fullmatch(key.name + ".tmp-42.xml")["pid"] == "42"
    assert not CACHE_NAME_RE.fullmatch(key.name + ".txt")


# --------------------------------------------------------------------------- ensemble.json

# the ensemble.json `make demo`'s train-folds wrote before `records.EnsembleSpec`
OLD_ENSEMBLE = """{
  "format_version": 1,
  "name": "demo",
  "recipe": "demo",
  "k": 2,
  "seed": 0,
  "data": "/tmp/demo/shards",
  "members": [
    {
      "name": "unet-se",
      "weight": 1.0,
      "folds": [
        {
          "fold": 0,
          "path": "unet-se/fold_0",
          "sha256": "ed36d61f4ff407ef1a7c3ce6dc3e829d1f70596849b842af1af1b9b949773334",
          "val_miou": 0.554831,
          "best_epoch": 4,
          "epochs": 5,
          "epochs_run": 5
        },
        {
          "fold": 1,
          "path": "unet-se/fold_1",
          "sha256": "8e3a2326c0e4c6fc78c019049890a2ff4ca75519a8633a64d6936a17f01b596a",
          "val_miou": 0.42504,
          "best_epoch": 4,
          "epochs": 5,
          "epochs_run": 5
        }
      ],
      "oof_miou": 0.481021,
      "oof_iou": [
        null,
        0.823907,
        0.614323,
        0.43946,
        0.046393
      ]
    }
  ],
  "oof_miou_ensemble": 0.481021,
  "oof_iou_ensemble": [
    null,
    0.823907,
    0.614323,
    0.43946,
    0.046393
  ],
  "selected": [
    "unet-se"
  ]
}
"""
SHA = "ab" * 32


def _hand_edited() -> dict:
    """An ensemble file as a user leaves it: keys reordered, notes of their own at every level,
    integer weights and temperatures, a fold without "path", a selected and calibrated run."""
    fold = {"sha256": SHA, "fold": 0, "note": "retrained", "val_miou": 0.5, "epochs": 3}
    return {"comment": "my best run", "members": [
        {"weight": 2, "name": "a", "folds": [fold, {**fold, "fold": 1, "path": "a/fold_1"}],
         "tag": ["x", 1]},
        {"name": "b", "folds": [{"fold": 0, "sha256": SHA}], "oof_miou": None}],
        "name": "r", "format_version": 1, "selected": ["b", "a"],
        "calibration": {"temperature": 2, "applied": "ensemble", "fitted_by": "me"},
        "selection": {"oof_miou": 0.7, "trace": []}, "extra": {"nested": [1, {"k": None}]}}


def test_ensemble_round_trip_is_byte_identical():
    """The file train-folds wrote before the record, and a hand-edited one, read and written
    again: the same bytes (key order, unknown keys, integers stay integers)."""
    for text in (OLD_ENSEMBLE, _text(_hand_edited())):
        spec = EnsembleSpec.from_json(json.loads(text), "ensemble.json")
        assert _text(spec.to_json()) == text
        assert EnsembleSpec.from_json(spec.to_json(), "ensemble.json") == spec
    spec = EnsembleSpec.from_json(_hand_edited(), "ensemble.json")
    assert spec.chosen == ["b", "a"] and spec.by_name["b"].weight == 1.0  # absent: the default
    assert spec.members[0].folds[0].path is None and spec.members[0].unknown == {"tag": ["x", 1]}
    assert spec.calibration.ensemble_temperature == 2 and spec.oof_score == 0.7


def test_ensemble_made_in_code_writes_what_train_folds_wrote():
    """A record built by train-folds (`oof.collect`) gives the old writer's bytes."""
    old = json.loads(OLD_ENSEMBLE)
    m = old["members"][0]
    folds = tuple(FoldSpec(**f) for f in m["folds"])
    spec = EnsembleSpec(name="demo", recipe="demo", k=2, seed=0, data="/tmp/demo/shards",
                        members=(MemberSpec("unet-se", 1.0, folds, m["oof_miou"],
                                            tuple(m["oof_iou"])),),
                        oof_miou_ensemble=old["oof_miou_ensemble"],
                        oof_iou_ensemble=tuple(old["oof_iou_ensemble"]), selected=("unet-se",))
    assert _text(spec.to_json()) == OLD_ENSEMBLE
    assert list(MemberSpec("a").to_json()) == ["name", "weight", "folds", "oof_miou", "oof_iou"]


def test_ensemble_edit_keeps_order_and_unknown_keys(tmp_path):
    """read -> dataclasses.replace -> write: every key stays where it was, unknown keys
    included; a key the edit adds goes last, as a dict assignment put it."""
    run = tmp_path / "run"
    (run / "a").mkdir(parents=True)
    (run / "ensemble.json").write_text(json.dumps(_hand_edited()))
    rf = RunFolder(run)
    spec = rf.read_ensemble()
    a = dataclasses.replace(spec.members[0], weight=0.25, oof_miou_single=0.6)
    rf.write_ensemble(dataclasses.replace(spec, members=(a, *spec.members[1:]), k=5))
    expected = _hand_edited()
    expected["members"][0].update(weight=0.25, oof_miou_single=0.6)
    expected["k"] = 5
    assert (run / "ensemble.json").read_text() == _text(expected)


def _oof_run_hand_edited(tmp_path, shards):
    """make_oof_run's folder with keys of a user's own at every level and reordered members."""
    from _runfolder import make_oof_run

    rng = np.random.default_rng(0)
    run = make_oof_run(tmp_path / "run", shards, {
        n: (lambda masks, seed: rng.dirichlet(np.ones(5), masks.shape).transpose(0, 3, 1, 2))
        for n in ("a", "b")}, n=24)
    d = json.loads((run / "ensemble.json").read_text())
    for m in d["members"]:
        m["folds"][0]["note"] = "mine"
    d["members"][1] = {"owner": "me", **d["members"][1]}
    d = {"comment": "keep me", **d, "trailer": [1, 2]}
    text = json.dumps(d, indent=1)  # not the indentation marsseg writes
    (run / "ensemble.json").write_text(text)
    return run, json.loads(text)


def test_select_and_calibrate_keep_hand_edits(tmp_path, shards):
    """`select` and `calibrate` change only their own keys: the file is the user's dict with
    those keys assigned, as the dict-editing code wrote it (order, unknown keys)."""
    from typer.testing import CliRunner

    from marsseg.cli import app

    run, before = _oof_run_hand_edited(tmp_path, shards)
    res = CliRunner().invoke(app, ["select", "--run", str(run)])
    assert res.exit_code == 0, res.output
    after = json.loads((run / "ensemble.json").read_text())
    for m, new in zip(before["members"], after["members"], strict=True):
        m["weight"], m["oof_miou_single"] = new["weight"], new["oof_miou_single"]
    for key in ("selected", "selection", "calibration"):
        before[key] = after[key]
    assert (run / "ensemble.json").read_text() == _text(before)
    assert list(after)[0] == "comment" and list(after["members"][1])[0] == "owner"

    res = CliRunner().invoke(app, ["calibrate", "--run", str(run)])
    assert res.exit_code == 0, res.output
    again = json.loads((run / "ensemble.json").read_text())
    before["calibration"] = again["calibration"]
    assert (run / "ensemble.json").read_text() == _text(before)


@pytest.mark.parametrize("edit,key", [
    (lambda d: d.update(k="2"), "k"),
    (lambda d: d.update(recipe=3), "recipe"),
    (lambda d: d.update(oof_iou_ensemble=["x"]), "oof_iou_ensemble"),
    (lambda d: d.update(selection=[1]), "selection"),
    (lambda d: d.update(selection={"oof_miou": "high"}), "selection.oof_miou"),
    (lambda d: d["members"][0].update(oof_miou=float("nan")), "members[0].oof_miou"),
    (lambda d: d["members"][0].update(weight=True), "members[0].weight"),
    (lambda d: d["members"][0]["folds"][1].update(epochs=1.5), "members[0].folds[1].epochs"),
    (lambda d: d["members"][0]["folds"][0].update(val_miou="high"),
     "members[0].folds[0].val_miou"),
    (lambda d: d["members"][0]["folds"][0].update(trained_on=1), "members[0].folds[0].trained_on"),
    (lambda d: d.update(calibration={"applied": "ensemble", "temperature": 0}),
     "calibration.temperature"),
])
def test_ensemble_wrong_type_names_file_and_key(edit, key):
    d = json.loads(OLD_ENSEMBLE)
    edit(d)
    with pytest.raises(InputError, match=rf"^e\.json: {re.escape(key)}"):
        EnsembleSpec.from_json(d, "e.json")
