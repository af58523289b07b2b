"""Records that cross modules: done.json, progress events, the predict summary, the cache key.

Each record's `to_json` gives exactly the dict written before the record existed (the golden
texts below were written by train_one_fold at cf13962, before `records.Done`), `from_json`
reads older files (keys they lack take defaults) and names the file and key of a wrong type.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from _runfolder import make_run

from marsseg._progress import EVENT_KEYS, Event, ProgressView
from marsseg.errors import InputError
from marsseg.predict import PredictSummary
from marsseg.records import Done
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
     "resumed_from": 0, "n_train": 12, "n_val": 4, "precision": "no", "device": "cpu"},
    {"event": "start", "member": "a", "fold": "all", "epochs": 3, "pid": 7, "time": 1.5,
     "epoch": 0, "resumed_from": None, "n_train": 16, "n_val": 0, "precision": "bf16",
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
