"""train-folds --reuse: finished folds of another run folder that are provably the folds this
command would train are adopted (copied, not trained); any difference trains them and says
why; an interrupted adoption leaves no half fold."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from _runfolder import make_npz, make_teacher, sha256
from rich.console import Console
from typer.testing import CliRunner

from marsseg import runfolder as RF
from marsseg.cli import app
from marsseg.data import prepare
from marsseg.errors import InputError
from marsseg.orchestrate import RunOptions, train_folds
from marsseg.reuse import Wanted, first_difference, open_source
from marsseg.runfolder import RunFolder

runner = CliRunner()

MEMBER = """[[members]]
name = "{name}"
epochs = 1
batch_size = 4
[members.model]
name = "unet"
args = {{ base_width = 4, depth = 2 }}
[members.augment]
hflip = 0.5
cutmix = 0.5
[members.loss]
terms = {terms}
ignore_background = {ignore}
"""


def recipe_text(members=("a",), seed: int = 1, folds: int = 2, split_seed: int | None = None,
                terms: str = "{ ce = 1.0 }", ignore: str = "false") -> str:
    head = f"folds = {folds}\nseed = {seed}\n" + (
        f"split_seed = {split_seed}\n" if split_seed is not None else "")
    return head + "".join(MEMBER.format(name=m, terms=terms, ignore=ignore) for m in members)


def write(tmp_path, text: str, name: str = "r"):
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


OPTS = RunOptions(sequential=True, threads=1, progress="none")


def run_plain(recipe, data, out, reuse=(), **kw):
    """train_folds with --progress plain; (its result, what it printed)."""
    buf = io.StringIO()
    opts = dataclasses.replace(OPTS, progress="plain", reuse=tuple(map(str, reuse)),
                               **{k: v for k, v in kw.items() if k != "epochs"})
    res = train_folds(recipe, data, out, opts, epochs=kw.get("epochs"),
                      console=Console(file=buf, width=200))
    return res, buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny shards, and a finished run of the one-member recipe (member a, 2 folds) on them."""
    base = tmp_path_factory.mktemp("reuse")
    shards = base / "shards"
    prepare(make_npz(base / "d.npz", n_train=12, n_test=4), shards, shard_size=4)
    source = base / "source"
    train_folds(write(base, recipe_text(("a",)), "one"), shards, source, OPTS)
    return {"base": base, "shards": shards, "source": source}


def weights_sha(run, member, fold):
    return sha256(run / member / f"fold_{fold}" / "model.safetensors")


def done_json(run, member, fold):
    return json.loads((run / member / f"fold_{fold}" / "done.json").read_text())


def test_adopts_the_same_member_and_trains_the_new_one(world, tmp_path):
    src, shards = world["source"], world["shards"]
    recipe = write(tmp_path, recipe_text(("a", "b")), "two")
    out = tmp_path / "run"
    res, text = run_plain(recipe, shards, out, reuse=[src])

    assert sorted(res["trained"]) == ["b/fold_0", "b/fold_1"]
    assert res["reused"] == {"a/fold_0": str(src), "a/fold_1": str(src)}
    for f in (0, 1):
        assert f"a fold {f}: reused from {src}" in text
        assert weights_sha(out, "a", f) == weights_sha(src, "a", f)
        old, new = done_json(src, "a", f), done_json(out, "a", f)
        assert new["reused_from"] == {"run": str(src), "fold": f"a/fold_{f}",
                                      "sha256": old["sha256"]}
        assert new["train_seconds"] == old["train_seconds"]  # not trained again
        assert {k: v for k, v in new.items() if k != "reused_from"} == old
        for name in ("config.json", "metrics.jsonl", "oof.h5"):
            assert (out / "a" / f"fold_{f}" / name).read_bytes() == \
                (src / "a" / f"fold_{f}" / name).read_bytes()
        assert not (out / "a" / f"fold_{f}" / "state").exists()
    assert sorted(p.name for p in (out / "a").iterdir()) == ["fold_0", "fold_1"]
    ens = json.loads((out / "ensemble.json").read_text())
    assert [m["name"] for m in ens["members"]] == ["a", "b"] and ens["selected"] == ["a", "b"]
    assert ens["members"][0]["oof_miou"] is not None

    r = runner.invoke(app, ["evaluate", "--ensemble", str(out), "--data", str(shards),
                            "--split", "train", "--no-tta", "--backend", "eager", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "scores.json").read_text())

    again, text = run_plain(recipe, shards, out, reuse=[src])  # nothing new to do
    assert again["trained"] == [] and again["reused"] == {} and "reused from" not in text


def test_an_adopted_fold_is_the_fold_trained_from_scratch(world, tmp_path):
    """What makes reuse honest: the same recipe on the same data trains these very bytes."""
    src = world["source"]
    out = tmp_path / "fresh"
    train_folds(write(tmp_path, recipe_text(("a", "b")), "two"), world["shards"], out,
                dataclasses.replace(OPTS, members=("a",)))
    for f in (0, 1):
        assert weights_sha(out, "a", f) == weights_sha(src, "a", f)
        with h5py.File(out / "a" / f"fold_{f}" / "oof.h5") as x, \
                h5py.File(src / "a" / f"fold_{f}" / "oof.h5") as y:
            assert np.array_equal(x["ids"][()], y["ids"][()])
            assert np.array_equal(x["probs"][()], y["probs"][()])


def test_the_ray_path_adopts_before_dispatching(world, tmp_path):
    """Every fold adopted: nothing is dispatched, so no Ray starts (and none is needed)."""
    out = tmp_path / "run"
    opts = dataclasses.replace(OPTS, sequential=False, reuse=(str(world["source"]),))
    res = train_folds(write(tmp_path, recipe_text(("a",))), world["shards"], out, opts)
    assert res["trained"] == [] and sorted(res["reused"]) == ["a/fold_0", "a/fold_1"]


def test_the_command_line_takes_a_list(world, tmp_path):
    src = world["source"]
    r = runner.invoke(app, ["train-folds", "--data", str(world["shards"]), "--recipe",
                            str(write(tmp_path, recipe_text(("a",)))), "--out",
                            str(tmp_path / "run"), "--sequential", "--threads", "1",
                            "--progress", "plain", "--reuse", f"{tmp_path / 'run'}x,{src}",
                            "--reuse", str(src)], catch_exceptions=False)
    assert r.exit_code == 2 and "no such run folder" in r.stderr  # every one is checked
    r = runner.invoke(app, ["train-folds", "--data", str(world["shards"]), "--recipe",
                            str(write(tmp_path, recipe_text(("a",)))), "--out",
                            str(tmp_path / "run"), "--sequential", "--progress", "plain",
                            "--reuse", f"{src},{src}"])
    assert r.exit_code == 0, r.output
    for f in (0, 1):
        assert f"a fold {f}: reused from {src} (weights sha256 " in r.stdout
        assert "trained at 1 thread(s); not trained)" in r.stdout
    assert "(0 fold(s) trained, 2 reused," in r.stdout


def _other_shards(w, tmp):
    other = tmp / "other"
    prepare(make_npz(tmp / "o.npz", n_train=12, n_test=4, seed=5), other, shard_size=4)
    return {"data": other}


def _teacher(w, tmp):
    teacher = make_teacher(tmp / "teacher", w["shards"], k=2, members=("t",), split_seed=1)
    return {"teacher": str(teacher)}


@pytest.mark.parametrize("text, setup, kw, why", [
    (recipe_text(), None, {"epochs": 2}, "epochs 1 != 2"),
    (recipe_text(terms="{ dice = 1.0 }"), None, {},
     "loss.terms {'ce': 1.0} != {'dice': 1.0}"),
    (recipe_text(seed=2, split_seed=1), None, {}, "seed 1 != 2"),
    (recipe_text(), _other_shards, {}, "other data (its train shards differ)"),
    (recipe_text(folds=3), None, {}, "folds k=2 != k=3"),
    (recipe_text(ignore="true"), _teacher, {}, "--teacher here, none there"),
    (recipe_text(), None, {"time_budget": 3.0}, "--time-budget here"),
], ids=["epochs", "loss", "seed", "data", "k", "teacher", "time-budget"])
def test_a_difference_is_trained_and_named(world, tmp_path, text, setup, kw, why):
    paths = setup(world, tmp_path) if setup else {}
    data = paths.pop("data", world["shards"])
    res, out = run_plain(write(tmp_path, text), data, tmp_path / "run", reuse=[world["source"]],
                         folds=(0,), **kw, **paths)
    assert res["trained"] == ["a/fold_0"] and res["reused"] == {}
    line = next(s for s in out.splitlines() if "not reused" in s)
    assert line == f"a fold 0: not reused from {world['source']} ({why}" + (
        ": its epochs depend on timing)" if "budget" in why else ")")
    assert "reused_from" not in done_json(tmp_path / "run", "a", 0)


def test_a_fold_pseudo_labelled_by_the_same_teacher_is_adopted(world, tmp_path):
    """--teacher on both sides: the same teacher ensemble is the same fold; another one
    (other fold weights, so another sha256) is a difference."""
    teacher = make_teacher(tmp_path / "teacher", world["shards"], k=2, members=("t",),
                           split_seed=1)
    recipe = write(tmp_path, recipe_text(ignore="true"))
    first, _ = run_plain(recipe, world["shards"], tmp_path / "first", folds=(0,),
                         teacher=str(teacher))
    assert first["trained"] == ["a/fold_0"]
    res, _ = run_plain(recipe, world["shards"], tmp_path / "same", reuse=[tmp_path / "first"],
                       folds=(0,), teacher=str(teacher))
    assert res["trained"] == [] and list(res["reused"]) == ["a/fold_0"]
    other = make_teacher(tmp_path / "other", world["shards"], k=2, members=("t",),
                         split_seed=1, in_fold=2)
    res, text = run_plain(recipe, world["shards"], tmp_path / "another",
                          reuse=[tmp_path / "first"], folds=(0,), teacher=str(other))
    assert res["trained"] == ["a/fold_0"]
    assert "(pseudo-labels of another teacher ensemble (sha256 " in text


def test_differences_recorded_in_the_source_fold(world):
    """What a source records of how its fold ran: precision, device, workers, a time
    budget or a teacher there."""
    src = open_source(world["source"], world["base"] / "elsewhere")
    done = RunFolder(src.run.path).read_done("a", 0)
    from marsseg.data import open_data
    from marsseg.device import resolve_training
    from marsseg.runfolder import data_fingerprint

    fp = data_fingerprint(open_data(world["shards"]))
    want = Wanted(src.recipe, src.splits, fp, resolve_training(done.precision, None))
    assert first_difference(src, want, "a", 0, done) is None
    other = "no" if done.precision == "bf16" else "bf16"
    cases = [
        (src, dataclasses.replace(done, precision=other), f"precision {other} != {done.precision}"),
        (src, dataclasses.replace(done, workers=2), "workers per fold 2 != 1"),
        (src, dataclasses.replace(done, device="cuda:0"), "device cuda:0 != cpu"),
        (dataclasses.replace(src, overrides={"time_budget_s": 60.0}), done,
         "--time-budget there: its epochs depend on timing"),
        (dataclasses.replace(src, overrides={"teacher": "/t"}), done,
         "--teacher /t there, none here"),
    ]
    for s, d, why in cases:
        assert first_difference(s, want, "a", 0, d) == why
    assert first_difference(src, want, "b", 0, done) == "its recipe has no member 'b'"


def test_an_interrupted_adoption_leaves_no_half_fold(world, tmp_path, monkeypatch):
    src, out = world["source"], tmp_path / "run"
    recipe = write(tmp_path, recipe_text(("a",)))
    real = shutil.copyfile

    def crash(a, b, *args, **kw):
        if str(a).endswith("oof.h5"):
            raise KeyboardInterrupt  # after the weights and config were copied
        return real(a, b, *args, **kw)

    monkeypatch.setattr(RF.shutil, "copyfile", crash)
    with pytest.raises(KeyboardInterrupt):
        run_plain(recipe, world["shards"], out, reuse=[src])
    monkeypatch.undo()
    fold = out / "a" / "fold_0"
    assert sorted(p.name for p in fold.iterdir()) == [".lock"]  # as it was: nothing copied
    assert sorted(p.name for p in (out / "a").iterdir()) == ["fold_0", "fold_1"]

    # A writer killed outright leaves its hidden folder; the rerun removes it, then adopts.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = out / "a" / f".fold_0.tmp-{dead.pid}"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    res, _ = run_plain(recipe, world["shards"], out, reuse=[src])
    assert res["trained"] == [] and sorted(res["reused"]) == ["a/fold_0", "a/fold_1"]
    assert not left.exists() and weights_sha(out, "a", 0) == weights_sha(src, "a", 0)
    assert sorted(os.listdir(out / "a")) == ["fold_0", "fold_1"]


def test_a_source_with_malformed_overrides_is_one_line(world, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world["source"], bad)
    (bad / "overrides.json").write_text('{"epochs": "40"}')
    with pytest.raises(InputError, match="overrides.json: 'epochs' is '40', expected an integer"):
        open_source(bad, tmp_path / "out")


def test_the_tracking_record_is_adopted_too():
    from marsseg import tracking

    assert tracking.TRACKING in RF.FINISHED_FILES and "state" not in RF.FINISHED_FILES


def test_the_lock_moves_with_the_adopted_fold(world, tmp_path):
    """The fold's lock file is carried into the adopted folder (a hard link): the lock
    train-folds holds on it is the lock of the folder now in place."""
    out = tmp_path / "run"
    RunFolder(out).fold_dir("a", 0).mkdir(parents=True)
    lock = RunFolder(out).fold_dir("a", 0) / ".lock"
    lock.write_text("")
    ino = lock.stat().st_ino
    src = RunFolder(world["source"])
    RunFolder(out).adopt_fold(src.fold_dir("a", 0), src.read_done("a", 0), {"run": "x"})
    assert lock.stat().st_ino == ino


def test_a_member_without_pseudo_labels_is_adopted_from_a_run_without_teacher(world, tmp_path):
    """With --teacher, a member with pseudo_labels = false trains as a run without --teacher
    does, so the source's fold of it is adopted; the member that uses them is trained."""
    teacher = make_teacher(tmp_path / "teacher", world["shards"], k=2, members=("t",),
                           split_seed=1)
    src = tmp_path / "src"
    run_plain(write(tmp_path, recipe_text(("a", "b"), ignore="true"), "src"), world["shards"],
              src, folds=(0,))
    mixed = recipe_text(("a", "b"), ignore="true").replace(
        'name = "b"', 'name = "b"\npseudo_labels = false')
    res, text = run_plain(write(tmp_path, mixed, "mixed"), world["shards"], tmp_path / "run",
                          reuse=[src], folds=(0,), teacher=str(teacher))
    assert res["trained"] == ["a/fold_0"] and list(res["reused"]) == ["b/fold_0"]
    assert f"a fold 0: not reused from {src} (--teacher here, none there)" in text
    # the other way round: a source fold trained on pseudo-labels is not such a member's fold
    res, text = run_plain(write(tmp_path, mixed.replace('name = "a"', 'name = "a"\n'
                                                        'pseudo_labels = false').replace(
        'name = "b"\npseudo_labels = false', 'name = "b"'), "flip"), world["shards"],
        tmp_path / "flip", reuse=[tmp_path / "run"], folds=(0,), teacher=str(teacher))
    assert sorted(res["trained"]) == ["a/fold_0", "b/fold_0"]
    assert (f"a fold 0: not reused from {tmp_path / 'run'} (--teacher {teacher} there, none "
            "here (pseudo_labels = false))") in text
