"""train-folds --teacher: the test images, pseudo-labelled for fold k by the teacher's fold-k
models only, train fold k and never validate; a teacher on other data or other splits, a
changed teacher and an old whole-ensemble targets file are refused; resume is exact."""

from __future__ import annotations

import hashlib
import io
import json

import h5py
import numpy as np
import pytest
from _runfolder import make_npz, make_teacher, tta_probs
from rich.console import Console

from marsseg.data import load_split, prepare
from marsseg.errors import InputError
from marsseg.orchestrate import RunOptions, train_folds
from marsseg.runfolder import data_fingerprint

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
    # fold 0's teacher models say class 2, fold 1's say 3: a pseudo-label tells its fold
    return {"base": base, "shards": shards, "recipe": recipe,
            "teacher": make_teacher(base / "teacher", shards, split_seed=1, in_fold=(2, 3))}


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
        assert (fit[1][-5:] == (2, 3)[k]).all()  # the label of the teacher's fold-k models
        done = json.loads((out / "a" / f"fold_{k}" / "done.json").read_text())
        assert done["n_pseudo"] == 5 and done["n_val"] == len(val_ids)
        with h5py.File(out / "a" / f"fold_{k}" / "oof.h5", "r") as f:
            assert sorted(f["ids"][()].tolist()) == sorted(val_ids)
    assert json.loads((out / "overrides.json").read_text())["teacher"] == str(
        world["teacher"].resolve())


def test_threshold_ignores_unsure_pixels(tmp_path):
    from marsseg.teaching import TargetsRecord, with_pseudo_labels, write_pseudo_file

    rec = TargetsRecord("t", "s", "d", "test", 2, "no", 0, 0, 2, pseudo_folds=(0, 1))
    images = np.arange(2 * 64 * 128, dtype=np.uint8).reshape(2, 64, 128)
    f = write_pseudo_file(tmp_path / "t.h5", rec, np.array([3, 9]), images)
    f["pseudo/0/labels"][...] = [np.full((64, 128), 2), np.full((64, 128), 4)]
    f["pseudo/0/confidence"][...] = [np.full((64, 128), 0.7), np.full((64, 128), 0.5)]
    f["pseudo/1/labels"][...] = 3
    f["pseudo/1/confidence"][...] = 0.95
    f.close()
    base = (np.zeros((1, 64, 128), np.uint8), np.ones((1, 64, 128), np.uint8))
    images2, masks = with_pseudo_labels(base, tmp_path / "t.h5", 0, 0.6)
    assert np.array_equal(images2[1:], images) and (masks[0] == 1).all()
    assert (masks[1] == 2).all() and (masks[2] == 0).all()  # sure enough: 2; not sure: ignored
    assert (with_pseudo_labels(base, tmp_path / "t.h5", 1, 0.6)[1][1:] == 3).all()
    assert with_pseudo_labels(base, None, 0, 0.6) is base
    with pytest.raises(InputError, match="no pseudo-labels of fold 2"):
        with_pseudo_labels(base, tmp_path / "t.h5", 2, 0.6)


def _labels_conf(probs):
    lab = probs[:, 1:].argmax(1) + 1  # classes 1..4, as submitted
    return lab, np.take_along_axis(probs, lab[:, None], 1)[:, 0]


def test_fold_k_is_labelled_by_the_teachers_fold_k_models_only(world, tmp_path):
    """Random teacher models, members weighted 1 : 3: fold k's stored labels are the TTA
    prediction of the two fold-k models so weighted, not the whole ensemble's."""
    from marsseg.device import resolve
    from marsseg.teacher import open_teacher, write_pseudo_labels

    t = make_teacher(tmp_path / "t", world["shards"], split_seed=1, in_fold=None,
                     weights={"a": 1.0, "b": 3.0})
    path = tmp_path / "targets.h5"
    rec = write_pseudo_labels(open_teacher(t, data_fingerprint(world["shards"]), need_oof=False),
                              world["shards"], path, rt=resolve(None, "no"),
                              dataset_sha256="d")
    assert rec.pseudo_folds == (0, 1) and rec.n_unlabeled == 5
    images = load_split(world["shards"], "test").images
    whole = _labels_conf(tta_probs([(t / m / f"fold_{k}", w) for m, w in (("a", 1), ("b", 3))
                                    for k in (0, 1)], images))
    with h5py.File(path, "r") as f:
        for k in (0, 1):
            probs = tta_probs([(t / "a" / f"fold_{k}", 1.0), (t / "b" / f"fold_{k}", 3.0)],
                              images)
            lab, conf = _labels_conf(probs)
            top2 = np.sort(probs[:, 1:], 1)
            sure = top2[:, -1] - top2[:, -2] > 1e-4  # not a near-tie that rounding may flip
            assert np.array_equal(f[f"pseudo/{k}/labels"][()][sure], lab[sure])
            got = f[f"pseudo/{k}/confidence"][()].astype(np.float32)
            np.testing.assert_allclose(got, conf, atol=2e-3)
            assert np.abs(got - whole[1]).max() > 0.01  # the whole ensemble says otherwise


def test_a_fold_all_model_never_teaches_a_fold(world, tmp_path):
    """A teacher member's model trained on every image (distill --all) is filed under a fold
    number; it never labels a fold, not even one its entry claims."""
    import shutil

    import torch
    from _runfolder import head_bias, sha256

    from marsseg.device import resolve
    from marsseg.models.registry import build_model, save_pretrained
    from marsseg.teacher import open_teacher, write_pseudo_labels

    t = tmp_path / "t"
    shutil.copytree(world["teacher"], t)
    torch.manual_seed(0)
    m = build_model("unet", base_width=4, depth=2)
    head_bias(4)(m)  # says big rock everywhere
    folder = save_pretrained(m, t / "a" / "fold_all", {"member": "a", "fold": "all"})
    spec = json.loads((t / "ensemble.json").read_text())
    entry = {"path": "a/fold_all", "sha256": sha256(folder / "model.safetensors")}
    spec["members"][0]["folds"] += [{"fold": 2, "trained_on": "all", **entry},
                                    {"fold": 0, **entry}]  # hand-filed under fold 0 too
    (t / "ensemble.json").write_text(json.dumps(spec))
    write_pseudo_labels(open_teacher(t, data_fingerprint(world["shards"]), need_oof=False),
                        world["shards"], tmp_path / "p.h5", rt=resolve(None, "no"),
                        dataset_sha256="d")
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert (f["pseudo/0/labels"][()] == 2).all()
        assert (f["pseudo/1/labels"][()] == 3).all()


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


def test_a_whole_ensemble_targets_file_is_refused(world, tmp_path):
    """A run folder whose targets file holds the older whole-ensemble pseudo-labels (no
    pseudo_folds in its record) is refused before anything is written."""
    out = tmp_path / "run"
    train(world, out, folds=(0,))
    with h5py.File(out / "targets.h5", "r+") as f:
        rec = json.loads(f.attrs["record"])
        del rec["pseudo_folds"]
        f.attrs["record"] = json.dumps(rec)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(InputError, match="targets.h5: pseudo-labels of the teacher's whole "
                                         "ensemble.*use a new --out"):
        train(world, out, folds=(1,))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_member_without_pseudo_labels_trains_as_without_teacher(world, tmp_path, monkeypatch):
    """pseudo_labels = false: that member's folds train on the labeled images only (bit for
    bit the fold a run without --teacher trains), while the other member gets them."""
    from marsseg import train as T

    seen = {}
    real = T.make_loaders

    def spy(fit, val, batch_size, gen, *sampler):
        seen.setdefault(len(seen), len(fit[0]))
        return real(fit, val, batch_size, gen, *sampler)

    two = RECIPE + RECIPE[RECIPE.index("[[members]]"):].replace('name = "a"', 'name = "b"').replace(
        "pseudo_threshold = 0.9", "pseudo_threshold = 0.9\npseudo_labels = false")
    recipe = tmp_path / "two.toml"
    recipe.write_text(two)
    monkeypatch.setattr(T, "make_loaders", spy)
    mixed = tmp_path / "mixed"
    train_folds(recipe, world["shards"], mixed, opts(world, folds=(0,)),
                console=Console(file=io.StringIO()))
    plain = tmp_path / "plain"
    train_folds(recipe, world["shards"], plain, opts(world, folds=(0,), teacher=None),
                console=Console(file=io.StringIO()))
    n_train = len(json.loads((mixed / "splits.json").read_text())["folds"][0]["train_ids"])

    def done(run, m):
        return json.loads((run / m / "fold_0" / "done.json").read_text())

    assert (done(mixed, "a")["n_pseudo"], done(mixed, "b")["n_pseudo"]) == (5, 0)
    assert sorted(seen.values()) == [n_train, n_train, n_train, n_train + 5]
    assert done(mixed, "b")["sha256"] == done(plain, "b")["sha256"]
    assert done(mixed, "a")["sha256"] != done(plain, "a")["sha256"]
