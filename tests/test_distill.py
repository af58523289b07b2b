"""distill: out-of-fold targets, stored once and refused after the teacher changes, a resumable
student whose run folder predict and evaluate use unchanged; the loss and augmentation parts."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from _runfolder import STUDENT, make_npz, make_teacher, tta_probs
from rich.console import Console
from typer.testing import CliRunner

from marsseg.augment import augment_batch, augment_soft
from marsseg.config import AugmentConfig
from marsseg.data import prepare
from marsseg.distill import DistillOptions, distill
from marsseg.errors import InputError
from marsseg.losses import soft_kl

runner = CliRunner()
QUIET = DistillOptions(progress="none", threads=1, precision="no")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny shards (16 train, 6 test with masks), a planted teacher on them, a student recipe."""
    base = tmp_path_factory.mktemp("distill")
    shards = base / "shards"
    prepare(make_npz(base / "d.npz", n_train=16, n_test=6, test_masks=True), shards)
    teacher = make_teacher(base / "teacher", shards, weights={"a": 3.0, "b": 1.0})
    recipe = base / "student.toml"
    recipe.write_text(STUDENT)
    return {"base": base, "shards": shards, "teacher": teacher, "recipe": recipe}


def run_distill(world, out, **opts):
    return distill(world["teacher"], world["shards"], out, world["recipe"],
                   DistillOptions(**{**QUIET.__dict__, **opts}),
                   console=Console(file=io.StringIO()))


def test_targets_are_out_of_fold_weighted_and_what_the_student_sees(world, tmp_path, monkeypatch):
    from marsseg.teaching import Taught

    seen = []
    real = Taught.loss

    def spy(self, model, loss_fn, aug, gen, images, masks, soft, **kw):
        seen.append(soft.clone())
        return real(self, model, loss_fn, aug, gen, images, masks, soft, **kw)

    monkeypatch.setattr(Taught, "loss", spy)
    ens = run_distill(world, tmp_path / "s", epochs=1)
    splits = json.loads((world["teacher"] / "splits.json").read_text())
    with h5py.File(tmp_path / "s" / "targets.h5", "r") as f:
        ids, probs, has = f["labeled/ids"][()], f["labeled/probs"][()], f["labeled/has"][()]
        unl = f["unlabeled/probs"][()]
    assert has.all() and ens["distilled_from"]["n_without_target"] == 0
    for k in (0, 1):
        rows = np.isin(ids, splits["folds"][k]["val_ids"])
        # member a (weight 3): one-hot 1+k out of fold; b (weight 1): uniform. The models
        # themselves say class 3 on every image, their training images included.
        want = np.full((5,), 0.25 * 0.2, np.float32)
        want[1 + k] += 0.75
        got = probs[rows].astype(np.float32)
        assert np.allclose(got, want[None, :, None, None], atol=2e-3), (k, got[0, :, 0, 0])
    assert (unl.argmax(1) == 3).all()  # the unlabeled images: the models' own prediction
    # The student trains on fold 0's training part = fold 1's held-out images: class 2 targets.
    assert seen and all(torch.allclose(s[:, 2], torch.tensor(0.75 + 0.05), atol=2e-3)
                        for s in seen)
    assert ens["heldout"]["teacher_oof_miou"] is not None and ens["heldout"]["images"] == len(
        splits["folds"][0]["val_ids"])
    assert ens["distilled_from"]["run"] == str(world["teacher"].resolve())


def test_unlabeled_targets_of_fold_0_and_of_the_whole_ensemble(world, tmp_path):
    """Random teacher models, members weighted 1 : 3: the stored fold-0 unlabeled targets are
    the flip-TTA prediction (and disagreement) of the two fold-0 models so weighted; the
    whole ensemble's (fold "all") are all four models'."""
    from marsseg.data import load_split
    from marsseg.device import resolve
    from marsseg.folds import load_train
    from marsseg.runfolder import data_fingerprint
    from marsseg.teacher import open_teacher, write_targets

    t = make_teacher(tmp_path / "t", world["shards"], in_fold=None, weights={"a": 1.0, "b": 3.0})
    rec = write_targets(open_teacher(t, data_fingerprint(world["shards"])), world["shards"],
                        load_train(world["shards"]), tmp_path / "targets.h5", unlabeled="test",
                        rt=resolve(None, "no"), dataset_sha256="d")
    assert rec.unlabeled_folds == (0,) and rec.n_unlabeled == 6
    images = load_split(world["shards"], "test").images
    plans = {"fold_0": [(t / "a/fold_0", 1.0), (t / "b/fold_0", 3.0)],
             "whole": [(t / m / f"fold_{k}", w) for m, w in (("a", 1.0), ("b", 3.0))
                       for k in (0, 1)]}
    with h5py.File(tmp_path / "targets.h5", "r") as f:
        assert json.loads(f.attrs["record"])["unlabeled_folds"] == [0]
        for name, base in (("fold_0", "unlabeled/fold/0"), ("whole", "unlabeled")):
            want = tta_probs(plans[name], images)
            got = f[f"{base}/probs"][()].astype(np.float32)
            np.testing.assert_allclose(got, want, atol=2e-3)
            lab = want[:, 1:].argmax(1)  # classes 1..4, as the predictor labels
            dis = sum(w * (tta_probs([(p, 1.0)], images)[:, 1:].argmax(1) != lab)
                      for p, w in plans[name]) / sum(w for _, w in plans[name])
            top2 = np.sort(want[:, 1:], 1)
            sure = top2[:, -1] - top2[:, -2] > 1e-3  # not a near-tie that rounding may flip
            got_dis = f[f"{base}/disagreement"][()].astype(np.float32)
            assert np.mean(np.abs(got_dis - dis)[sure] < 1e-3) > 0.99, name
        fold0 = f["unlabeled/fold/0/probs"][()].astype(np.float32)
        assert np.abs(fold0 - f["unlabeled/probs"][()]).max() > 0.01  # not the same targets


def test_fold_0_student_learns_the_fold_0_models_unlabeled_targets(world, tmp_path, monkeypatch):
    """A teacher of 3 folds whose fold-0 models say class 2 and fold-1/2 models class 3: the
    fold-0 student's unlabeled targets say 2 (its fold's models only, not a blend), the --all
    student's say 3 (the whole ensemble: 2/3 of it says 3)."""
    from marsseg.teaching import Taught

    teacher = make_teacher(tmp_path / "t", world["shards"], k=3, in_fold=(2, 3, 3))
    seen = {}
    real = Taught.next_unlabeled

    def spy(self):
        got = real(self)
        seen.setdefault(id(self), []).append(got[1].clone())
        return got

    monkeypatch.setattr(Taught, "next_unlabeled", spy)
    ens = distill(teacher, world["shards"], tmp_path / "s", world["recipe"],
                  dataclass_opts(epochs=1, all=True), console=Console(file=io.StringIO()))
    assert ens["trained"] == ["student/fold_0", "student/fold_all"] and len(seen) == 2
    for soft, cls in zip(seen.values(), (2, 3), strict=True):  # fold 0 trains first
        soft = torch.cat(soft)
        taught = soft.sum(1) > 0
        assert taught.float().mean() > 0.9 and (soft.argmax(1)[taught] == cls).all(), cls
    with h5py.File(tmp_path / "s" / "targets.h5", "r") as f:
        assert (f["unlabeled/fold/0/probs"][()].argmax(1) == 2).all()
        assert (f["unlabeled/probs"][()].argmax(1) == 3).all()


def test_older_whole_ensemble_unlabeled_targets_are_refused(world, tmp_path):
    """A student run folder whose targets.h5 has the whole ensemble's unlabeled targets only
    (no unlabeled_folds in its record): a rerun is refused and changes nothing; with
    --unlabeled none there are no unlabeled targets and it resumes."""
    def strip(out):
        with h5py.File(out / "targets.h5", "r+") as f:
            rec = json.loads(f.attrs["record"])
            del rec["unlabeled_folds"]
            f.attrs["record"] = json.dumps(rec)

    out = tmp_path / "s"
    run_distill(world, out, epochs=1)
    strip(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for all_ in (False, True):
        with pytest.raises(InputError, match=r"targets\.h5: unlabeled targets of the teacher's "
                                             r"whole ensemble only.*use a new --out"):
            run_distill(world, out, epochs=1, all=all_)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    run_distill(world, tmp_path / "n", epochs=1, unlabeled="none")
    strip(tmp_path / "n")
    assert run_distill(world, tmp_path / "n", epochs=1, unlabeled="none")["trained"] == []


def test_stored_targets_are_refused_after_the_teacher_changes(world, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(world["teacher"], teacher)
    out = tmp_path / "s"
    distill(teacher, world["shards"], out, world["recipe"], dataclass_opts(epochs=1),
            console=Console(file=io.StringIO()))
    spec = json.loads((teacher / "ensemble.json").read_text())
    spec["members"][1]["weight"] = 2.0  # what `select` does: another ensemble
    (teacher / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match=r"targets\.h5: made from another teacher"):
        distill(teacher, world["shards"], out, world["recipe"], dataclass_opts(epochs=1),
                console=Console(file=io.StringIO()))


def dataclass_opts(**kw):
    return DistillOptions(**{**QUIET.__dict__, **kw})


class Interrupt(Exception):
    pass


def test_resume_continues_bit_identically(world, tmp_path, monkeypatch):
    run_distill(world, tmp_path / "whole", epochs=3)
    from marsseg import _progress

    real = _progress.ProgressView.update

    def stop(self, events):
        real(self, events)
        if any(e.event == "epoch" and e.epoch == 1 for e in events):
            raise Interrupt

    monkeypatch.setattr(_progress.ProgressView, "update", stop)
    with pytest.raises(Interrupt):
        run_distill(world, tmp_path / "cut", epochs=3)
    monkeypatch.setattr(_progress.ProgressView, "update", real)
    assert not (tmp_path / "cut" / "student" / "fold_0" / "done.json").exists()
    run_distill(world, tmp_path / "cut", epochs=3)

    def digest(run):
        return hashlib.sha256((run / "student" / "fold_0" / "model.safetensors").read_bytes()
                              ).hexdigest()

    assert digest(tmp_path / "whole") == digest(tmp_path / "cut")
    losses = [[json.loads(x)["loss"] for x in (r / "student/fold_0/metrics.jsonl").read_text()
               .splitlines()] for r in (tmp_path / "whole", tmp_path / "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_student_run_folder_is_an_ordinary_run(world, tmp_path):
    from marsseg.cli import app

    out = tmp_path / "s"
    res = runner.invoke(app, ["distill", "--ensemble", str(world["teacher"]), "--data",
                              str(world["shards"]), "--out", str(out), "--recipe",
                              str(world["recipe"]), "--epochs", "1", "--progress", "plain",
                              "--threads", "1", "--precision", "no"])
    assert res.exit_code == 0, res.output
    ens = json.loads((out / "ensemble.json").read_text())
    assert [len(m["folds"]) for m in ens["members"]] == [1] and ens["selected"] == ["student"]
    assert ens["distilled_from"]["sha256"] and "without a teacher target" in res.output
    res = runner.invoke(app, ["predict", "--ensemble", str(out), "--data", str(world["shards"]),
                              "--out", str(tmp_path / "sub.csv"), "--tta", "-q"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == 7
    res = runner.invoke(app, ["evaluate", "--ensemble", str(out), "--data", str(world["shards"]),
                              "--tta"])
    assert res.exit_code == 0, res.output
    # The held-out slice (the teacher's fold 0 validation part) scored the ordinary way.
    res = runner.invoke(app, ["evaluate", "--ensemble", str(out), "--data", str(world["shards"]),
                              "--split", "train"])
    assert res.exit_code == 0, res.output
    scores = json.loads((out / "scores.json").read_text())
    assert scores["rows"][-1]["images"] == ens["heldout"]["images"]


def test_all_retrains_on_every_image_for_the_chosen_epochs(world, tmp_path):
    from marsseg.cli import app

    ens = run_distill(world, tmp_path / "s", epochs=2, all=True)
    (entry,) = ens["members"][0]["folds"]
    assert entry["path"] == "student/fold_all" and entry["trained_on"] == "all"
    done0 = json.loads((tmp_path / "s/student/fold_0/done.json").read_text())
    done = json.loads((tmp_path / "s/student/fold_all/done.json").read_text())
    assert done["epochs"] == done0["best_epoch"] + 1 and done["n_val"] == 0
    assert done["n_train"] == 16 and done["best_epoch"] == done["epochs"] - 1  # the last kept
    # no image is held out from fold "all": out-of-fold scoring says so in one line, exit 2
    res = runner.invoke(app, ["evaluate", "--ensemble", str(tmp_path / "s"), "--data",
                              str(world["shards"]), "--split", "train"])
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.strip().splitlines()
    assert "student/fold_all was trained on every image" in line and "--split test" in line, line
    res = runner.invoke(app, ["evaluate", "--ensemble", str(tmp_path / "s"), "--data",
                              str(world["shards"]), "--no-tta", "--quiet"])
    assert res.exit_code == 0, res.output  # its rows name the folder, not the fold number
    rows = json.loads((tmp_path / "s" / "scores.json").read_text())["rows"]
    assert rows[0]["name"] == "student/fold_all", rows[0]
    with pytest.raises(InputError, match="--all"):  # the options are the run folder's
        run_distill(world, tmp_path / "s", epochs=2)


def test_all_may_be_added_to_a_finished_selection_run(world, tmp_path):
    """Select the epoch first, look at the held-out score, then add --all: fold 0 is reused
    (not retrained), fold "all" trains for its chosen epochs, and --all cannot be taken back."""
    ens0 = run_distill(world, tmp_path / "s", epochs=2)
    weights0 = (tmp_path / "s/student/fold_0/model.safetensors").read_bytes()
    ens = run_distill(world, tmp_path / "s", epochs=2, all=True)
    assert ens["trained"] == ["student/fold_all"]
    assert (tmp_path / "s/student/fold_0/model.safetensors").read_bytes() == weights0
    (entry,) = ens["members"][0]["folds"]
    assert entry["trained_on"] == "all" and ens["heldout"] == ens0["heldout"]
    assert json.loads((tmp_path / "s/overrides.json").read_text())["all"] is True
    same = run_distill(world, tmp_path / "s", epochs=2, all=True)  # done: nothing trains
    assert same["trained"] == [] and same["members"] == ens["members"]
    with pytest.raises(InputError, match="--all"):
        run_distill(world, tmp_path / "s", epochs=2)
    with pytest.raises(InputError, match="--epochs"):  # only --all may be added
        run_distill(world, tmp_path / "s", epochs=3, all=True)


def test_time_budget_decides_the_selection_runs_epochs(world, tmp_path):
    ens = run_distill(world, tmp_path / "s", time_budget=30.0)
    budget = json.loads((tmp_path / "s/student/fold_0/budget.json").read_text())
    done = json.loads((tmp_path / "s/student/fold_0/done.json").read_text())
    assert budget["epochs"] == done["epochs"] >= 1 and ens["selected"] == ["student"]
    with pytest.raises(InputError, match="--time-budget"):  # pinned in the run folder
        run_distill(world, tmp_path / "s", epochs=1)


def test_gold_masks_are_never_read(world, tmp_path):
    """Test masks that every read would refuse (label 9, dataset.json rehashed) change nothing."""
    bad = tmp_path / "shards"
    shutil.copytree(world["shards"], bad)
    with h5py.File(bad / "test-000.h5", "r+") as f:
        f["masks"][...] = 9
    info = json.loads((bad / "dataset.json").read_text())
    for s in info["splits"]["test"]["shards"]:
        s["sha256"] = hashlib.sha256((bad / s["file"]).read_bytes()).hexdigest()
    (bad / "dataset.json").write_text(json.dumps(info))
    teacher = make_teacher(tmp_path / "teacher", bad)
    ens = distill(teacher, bad, tmp_path / "s", world["recipe"], dataclass_opts(epochs=1),
                  console=Console(file=io.StringIO()))
    assert ens["distilled_from"]["n_unlabeled"] == 6


def test_a_busy_student_is_refused_at_once(world, tmp_path):
    from marsseg.runfolder import RunFolder

    run = RunFolder(tmp_path / "s")
    with run.lock_folds([("student", 0)]), pytest.raises(InputError, match="fold_0"):
        run_distill(world, tmp_path / "s", epochs=1)


def test_teacher_with_some_folds_teaches_the_rest_by_hard_labels(world, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(world["teacher"], teacher)
    spec = json.loads((teacher / "ensemble.json").read_text())
    for m in spec["members"]:
        m["folds"] = m["folds"][:1]  # trained with --folds 0 only
    (teacher / "ensemble.json").write_text(json.dumps(spec))
    ens = distill(teacher, world["shards"], tmp_path / "s", world["recipe"],
                  dataclass_opts(epochs=1, unlabeled="none"), console=Console(file=io.StringIO()))
    n1 = len(json.loads((teacher / "splits.json").read_text())["folds"][1]["val_ids"])
    assert ens["distilled_from"]["n_without_target"] == n1
    assert ens["distilled_from"]["n_unlabeled"] == 0


# --- the parts ---------------------------------------------------------------------------------


def test_soft_kl_on_hand_made_tensors():
    logits = torch.zeros(1, 5, 1, 2)
    soft = torch.zeros(1, 5, 1, 2)
    assert soft_kl(logits, soft).item() == 0.0  # no target anywhere
    soft[0, :, 0, 0] = 0.2  # uniform target at pixel 0 = the student's: KL 0
    assert soft_kl(logits, soft).item() == pytest.approx(0.0, abs=1e-6)
    soft[0, :, 0, 0] = 0
    soft[0, 1, 0, 0] = 0.5  # one-hot class 1, weight 0.5: 0.5 * log 5 over 1 pixel
    assert soft_kl(logits, soft).item() == pytest.approx(0.5 * np.log(5), rel=1e-5)
    # temperature: T^2 KL between the softened distributions
    logits = torch.tensor([2.0, 0, 0, 0, 0]).reshape(1, 5, 1, 1)
    p = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    soft = p.reshape(1, 5, 1, 1).clone()
    t = 2.0
    q = p ** (1 / t) / (p ** (1 / t)).sum()
    s = torch.softmax(logits.flatten() / t, 0)
    want = t * t * (q * (q.log() - s.log())).sum()
    assert soft_kl(logits, soft, t).item() == pytest.approx(want.item(), rel=1e-3)


def test_augment_soft_moves_targets_with_the_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 64, 128) * 255
    masks = torch.randint(0, 5, (6, 64, 128))
    masks[0, 10:20, 10:20] = 4
    # the target is the mask itself (one-hot): augmentation must keep them equal
    soft = torch.nn.functional.one_hot(masks, 5).permute(0, 3, 1, 2).float()
    cfg = AugmentConfig(hflip=0.5, vflip=0.5, cutmix=1.0, rock_paste=1.0, cutmix_mode="sample")
    from marsseg.augment import RockImages

    rocks = RockImages.from_arrays(images[:, 0].to(torch.uint8).numpy(), masks.numpy())
    x, y, q = augment_soft(images, masks, soft, cfg, generator=g, rock_images=rocks)
    assert torch.equal(q.argmax(1), y) and torch.allclose(q.sum(1), torch.ones_like(y).float())
    g.manual_seed(0)
    x2, y2 = augment_batch(images, masks, cfg, generator=g, rock_images=rocks)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # the same draws as the plain pipeline


def test_unlabeled_weighting_confidence_or_disagreement(world, tmp_path):
    from marsseg.student import DistillConfig
    from marsseg.teaching import Taught

    run_distill(world, tmp_path / "s", epochs=1)
    path = tmp_path / "s" / "targets.h5"
    with h5py.File(path, "r+") as f:
        f["unlabeled/disagreement"][0] = 0.5  # image 0: half the models disagree
    for weighting, image0 in (("confidence", None), ("disagreement", 0.0)):
        t = Taught(path, DistillConfig(unlabeled_weighting=weighting, unlabeled_batch_size=6))
        t.open_unlabeled(10, 4, "cpu", "all")  # the whole ensemble's targets
        t.start_epoch(0)
        ds = t._unlabeled.dataset
        _, _, soft = ds.__getitems__(list(range(6)))
        w = soft.sum(1)
        if weighting == "confidence":
            with h5py.File(path, "r") as f:
                p = torch.from_numpy(f["unlabeled/probs"][()].astype(np.float32))
            assert torch.allclose(w, p.max(1).values, atol=1e-3)
            assert (w > 0.9).all()  # the teacher is sure everywhere (class 3)
        else:
            assert (w[0] == image0).all() and (w[1:] == 1).all()
        t.close()
    t = Taught(path, DistillConfig())
    with pytest.raises(InputError, match="no unlabeled targets of the teacher's fold 1"):
        t.open_unlabeled(10, 4, "cpu", 1)
    t.close()


def test_student_recipe_checks(world, tmp_path):
    from marsseg.config import ModelConfig
    from marsseg.student import load_student

    model = ModelConfig("unet", {"base_width": 4, "depth": 2})
    r, d = load_student(world["recipe"], model)
    assert r.members[0].model == model and d.temperature == 2.0
    bad = tmp_path / "b.toml"
    bad.write_text(STUDENT + "colour = 1\n")
    with pytest.raises(InputError, match="distill.colour"):
        load_student(bad, model)
    bad.write_text(STUDENT.replace("temperature = 2.0", "temperature = 0"))
    with pytest.raises(InputError, match="distill.temperature"):
        load_student(bad, model)
    bad.write_text(STUDENT + '[[members]]\nname = "two"\n')
    with pytest.raises(InputError, match="exactly one"):
        load_student(bad, model)


@pytest.mark.slow
def test_sigterm_then_rerun_resumes(world, tmp_path, real_cli):
    from marsseg.cli import app

    out = tmp_path / "s"
    args = ["distill", "--ensemble", str(world["teacher"]), "--data", str(world["shards"]),
            "--out", str(out), "--recipe", str(world["recipe"]), "--epochs", "8",
            "--threads", "1", "--progress", "plain", "--precision", "no"]
    proc = real_cli.start(args)
    state = out / "student" / "fold_0" / "state" / "trainer.json"
    real_cli.wait_for(proc, state.exists, "an epoch saved", timeout=300)
    rc, err = real_cli.terminate(proc)
    assert rc == 143 and err.splitlines()[-1:] == ["terminated"], err
    assert not (out / "student" / "fold_0" / "done.json").exists()
    assert (out / "targets.h5").exists() and not list(out.glob("targets.h5.tmp*"))
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "student/fold_0/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(8)) and any(r.get("resumed") for r in rows)
    assert rows[0]["worker"]["pid"] == proc.pid
