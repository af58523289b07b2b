"""train-folds --teacher: the teacher's pseudo-labelled test images train every fold, never
validate; a teacher on other data and a changed teacher are refused; resume is exact."""

from __future__ import annotations

import hashlib
import io
import json

import h5py
import numpy as np
import pytest
from _runfolder import make_npz, make_teacher
from rich.console import Console

from marsseg.data import load_split, prepare
from marsseg.errors import InputError
from marsseg.orchestrate import RunOptions, train_folds

RECIPE = """folds = 2
seed = 1
[[members]]
name = "a"
epochs = 2
batch_size = 4
pseudo_threshold = 0.9
[members.model]
name = "unet"
args = { base_width = 4, depth = 2 }
[members.loss]
ignore_background = true
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("pseudo")
    shards = base / "shards"
    prepare(make_npz(base / "d.npz", n_train=12, n_test=5, test_masks=True), shards)
    recipe = base / "r.toml"
    recipe.write_text(RECIPE)
    return {"base": base, "shards": shards, "recipe": recipe,
            "teacher": make_teacher(base / "teacher", shards)}


def opts(world, **kw):
    return RunOptions(**{"sequential": True, "threads": 1, "precision": "no", "progress": "none",
                         "teacher": str(world["teacher"]), **kw})


def train(world, out, **kw):
    return train_folds(world["recipe"], world["shards"], out, opts(world, **kw),
                       console=Console(file=io.StringIO()))


def test_pseudo_labelled_images_train_but_never_validate(world, tmp_path, monkeypatch):
    from marsseg import train as T

    seen = []
    real = T.make_loaders

    def spy(fit, val, batch_size, gen, *sampler):
        seen.append((fit, val))
        return real(fit, val, batch_size, gen, *sampler)

    monkeypatch.setattr(T, "make_loaders", spy)
    out = tmp_path / "run"
    train(world, out)
    split = load_split(world["shards"], "train")
    test = load_split(world["shards"], "test")
    splits = json.loads((out / "splits.json").read_text())
    assert len(seen) == 2
    for k, (fit, val) in enumerate(seen):
        val_ids = splits["folds"][k]["val_ids"]
        rows = np.isin(split.ids, val_ids)
        assert np.array_equal(val[0], split.images[rows])  # validation: its labeled images only
        assert np.array_equal(fit[0][-5:], test.images)  # training: + the test images
        assert (fit[1][-5:] == 3).all()  # the teacher's label, confident everywhere
        done = json.loads((out / "a" / f"fold_{k}" / "done.json").read_text())
        assert done["n_pseudo"] == 5 and done["n_val"] == len(val_ids)
        with h5py.File(out / "a" / f"fold_{k}" / "oof.h5", "r") as f:
            assert sorted(f["ids"][()].tolist()) == sorted(val_ids)
    assert json.loads((out / "overrides.json").read_text())["teacher"] == str(
        world["teacher"].resolve())


def test_threshold_ignores_unsure_pixels(tmp_path):
    from marsseg.teaching import TargetsRecord, with_pseudo_labels, write_targets_file

    rec = TargetsRecord("t", "s", "d", "test", 2, "no", 0, 0, 2)
    images = np.arange(2 * 64 * 128, dtype=np.uint8).reshape(2, 64, 128)
    f = write_targets_file(tmp_path / "t.h5", rec, np.zeros(0, np.int64), np.array([3, 9]), images)
    probs = np.zeros((2, 5, 64, 128), np.float16)
    probs[0, 2], probs[0, 1] = 0.7, 0.3  # sure enough: 2
    probs[1, 4], probs[1, 3] = 0.5, 0.5  # not sure: ignored
    probs[1, 0, 0, 0], probs[1, 4, 0, 0] = 0.9, 0.1  # background is never a pseudo-label
    f["unlabeled/probs"][...] = probs
    f.close()
    base = (np.zeros((1, 64, 128), np.uint8), np.ones((1, 64, 128), np.uint8))
    images2, masks = with_pseudo_labels(base, tmp_path / "t.h5", 0.6)
    assert np.array_equal(images2[1:], images) and (masks[0] == 1).all()
    assert (masks[1] == 2).all() and (masks[2] == 0).all()
    assert with_pseudo_labels(base, None, 0.6) is base


def test_resume_is_exact(world, tmp_path, monkeypatch):
    from marsseg import _progress

    train(world, tmp_path / "whole", folds=(0,))
    real = _progress.ProgressView.update

    class Stop(Exception):
        pass

    def stop(self, events):
        real(self, events)
        if any(e.event == "epoch" and e.epoch == 0 for e in events):
            raise Stop

    monkeypatch.setattr(_progress.ProgressView, "update", stop)
    with pytest.raises(Stop):
        train(world, tmp_path / "cut", folds=(0,))
    monkeypatch.setattr(_progress.ProgressView, "update", real)
    train(world, tmp_path / "cut", folds=(0,))

    def digest(run):
        return hashlib.sha256((run / "a/fold_0/model.safetensors").read_bytes()).hexdigest()

    assert digest(tmp_path / "whole") == digest(tmp_path / "cut")
    rows = [json.loads(x) for x in (tmp_path / "cut/a/fold_0/metrics.jsonl").read_text()
            .splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1].get("resumed")


def test_rerun_with_another_teacher_or_none_is_refused(world, tmp_path):
    out = tmp_path / "run"
    train(world, out, folds=(0,))
    with pytest.raises(InputError, match="--teacher"):
        train_folds(world["recipe"], world["shards"], out,
                    opts(world, teacher=None, folds=(1,)), console=Console(file=io.StringIO()))
    spec = json.loads((world["teacher"] / "ensemble.json").read_text())
    changed = tmp_path / "teacher"
    import shutil

    shutil.copytree(world["teacher"], changed)
    spec["members"][0]["weight"] = 5.0
    (changed / "ensemble.json").write_text(json.dumps(spec))
    (out / "overrides.json").write_text(json.dumps({"teacher": str(changed.resolve())}))
    with pytest.raises(InputError, match="another teacher"):
        train(world, out, teacher=str(changed), folds=(1,))
