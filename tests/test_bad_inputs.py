"""Every bad input README's "Errors" section promises to reject, in one table.

Each row runs one `marsseg-cli` command line and checks the contract for bad input:
exit code 2, exactly one non-empty line on stderr that names the problem, no
`Traceback` anywhere, and no file created, changed or left behind (the shared world
and the row's own temp folder are snapshotted before and after).

To add a row: append `row(id, argv, setup, names)` to ROWS. `argv` items are
formatted with the world's paths ({npz}, {shards}, {run}, {recipe}, ...), `{tmp}`
(the row's own empty folder) and whatever `setup(world, tmp)` returns. Build bad
files inside `tmp` (never edit the world: the rows share it). `names` is a
substring the error line must contain (formatted the same way), e.g. the file or key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from _runfolder import STUDENT, make_npz, make_run, make_teacher
from _runfolder import TINY_RECIPE as RECIPE
from typer.testing import CliRunner

from marsseg.cli import app
from marsseg.data import prepare

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny prepared shard folder, a finished run folder on it and a valid recipe."""
    base = tmp_path_factory.mktemp("bad-inputs")
    w = SimpleNamespace(base=base)
    w.npz = make_npz(base / "d.npz", n_train=8, n_test=6, test_masks=True)
    w.shards = base / "shards"
    prepare(w.npz, w.shards, shard_size=4)
    w.unlabeled = make_npz(base / "unlabeled.npz", n_train=8, n_test=3)
    w.other = base / "other-shards"  # another data set: 10 train images, not 8
    prepare(make_npz(base / "o.npz", n_train=10, n_test=2, test_masks=True, seed=3), w.other)
    w.run = make_run(base / "run", metrics=True)
    folds = [{"fold": 0, "val_ids": [0, 1, 2, 3], "train_ids": [4, 5, 6, 7]},
             {"fold": 1, "val_ids": [4, 5, 6, 7], "train_ids": [0, 1, 2, 3]}]
    (w.run / "splits.json").write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))
    # A scores.json that a failed evaluate/report must leave exactly as it is.
    (w.run / "scores.json").write_text(json.dumps({"sentinel": True}))
    w.recipe = base / "tiny.toml"
    w.recipe.write_text(RECIPE)
    return w


# ----------------------------------------------------------------------------- setups


def recipe_with(text: str, name: str = "r.toml"):
    def setup(w, tmp):
        (tmp / name).write_text(text)
        return {"bad": tmp / name}
    return setup


def npz_with(**changes):
    """The world's npz with keys replaced (a value None drops the key)."""
    def setup(w, tmp):
        with np.load(w.npz) as z:
            arrays = {k: z[k] for k in z.files}
        for k, v in changes.items():
            if v is None:
                arrays.pop(k)
            else:
                arrays[k] = v(arrays) if callable(v) else v
        np.savez(tmp / "bad.npz", **arrays)
        return {"bad": tmp / "bad.npz"}
    return setup


def file_with(content: bytes, name: str):
    def setup(w, tmp):
        (tmp / name).write_bytes(content)
        return {"bad": tmp / name}
    return setup


def shards_with_label(split: str, value: int | None = 9, rehash: bool = True):
    """Shards whose first `split` shard holds `value` in a mask (None: another valid label
    than the one there); with `rehash` its sha256 in dataset.json is updated too (a shard
    written that way, not edited after prepare)."""
    def setup(w, tmp):
        bad = tmp / "shards"
        shutil.copytree(w.shards, bad)
        with h5py.File(bad / f"{split}-000.h5", "r+") as f:
            old = int(f["masks"][1, 5, 7])
            f["masks"][1, 5, 7] = old % 4 + 1 if value is None else value
        if rehash:
            info = json.loads((bad / "dataset.json").read_text())
            for s in info["splits"][split]["shards"]:
                s["sha256"] = hashlib.sha256((bad / s["file"]).read_bytes()).hexdigest()
            (bad / "dataset.json").write_text(json.dumps(info))
        return {"bad": bad, "shard": bad / f"{split}-000.h5"}
    return setup


def _weight(value: str):
    def edit(run: Path) -> None:
        text = (run / "ensemble.json").read_text()
        (run / "ensemble.json").write_text(text.replace('"weight": 1.0', f'"weight": {value}', 1))
    return edit


def _calibration(block):
    """ensemble.json with a "calibration" block (NaN and Infinity written as JSON allows them)."""
    def edit(run: Path) -> None:
        spec = json.loads((run / "ensemble.json").read_text())
        spec["calibration"] = block
        (run / "ensemble.json").write_text(json.dumps(spec))
    return edit


def _copy_with(what: str, edit):
    """A copy of the world's `what` folder ("shards" or "run") with `edit(folder)` applied."""
    def setup(w, tmp):
        bad = tmp / what
        shutil.copytree(getattr(w, what), bad)
        edit(bad)
        return {"bad": bad}
    return setup


def shards_with(edit):
    return _copy_with("shards", edit)


def _empty_test_split(folder: Path) -> None:
    meta = json.loads((folder / "dataset.json").read_text())
    meta["splits"]["test"].update(count=0, shards=[])
    (folder / "dataset.json").write_text(json.dumps(meta))


def _truncate(folder: Path) -> None:
    data = (folder / "test-000.h5").read_bytes()
    (folder / "test-000.h5").write_bytes(data[: len(data) // 3])


def run_with(edit):
    return _copy_with("run", edit)


def _replace_weights(run: Path) -> None:
    shutil.copyfile(run / "b/fold_1/model.safetensors", run / "a/fold_0/model.safetensors")


def needs_cpu_only_torch(w, tmp):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA: --device cuda is valid here")
    return {}


def existing_folder(w, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return {"bad": tmp / "out"}


def _spec_edit(edit):
    """A run copy whose ensemble.json is replaced by `edit(spec)` (in place)."""
    def change(run: Path) -> None:
        spec = json.loads((run / "ensemble.json").read_text())
        edit(spec)
        (run / "ensemble.json").write_text(json.dumps(spec))
    return run_with(change)


def _member_name(name: str):
    """Member a renamed to `name` in ensemble.json, its folds without a "path" key."""
    def edit(spec):
        m = spec["members"][0]
        m["name"] = name
        for f in m["folds"]:
            f.pop("path", None)
        spec["selected"] = [name]
    return _spec_edit(edit)


def _fold_path(value: str):
    def edit(spec):
        spec["members"][0]["folds"][0]["path"] = value
    return _spec_edit(edit)


def _fold_all(run: Path) -> None:
    """Member a as `distill --all` leaves it: one model, fold "all" (numbered k), no held-out
    images."""
    (run / "a" / "fold_1").rename(run / "a" / "fold_all")
    spec = json.loads((run / "ensemble.json").read_text())
    (entry,) = [f for f in spec["members"][0]["folds"] if f["fold"] == 1]
    spec["members"] = [{**spec["members"][0], "folds": [
        {**entry, "fold": 2, "path": "a/fold_all", "trained_on": "all"}]}]
    spec["selected"] = ["a"]
    (run / "ensemble.json").write_text(json.dumps(spec))


def _no_sha(spec):
    for m in spec["members"]:
        for f in m["folds"]:
            f.pop("sha256")


def fold_symlinked_to_world(w, tmp):
    """A run copy whose a/fold_0 is a symbolic link to the world run's a/fold_0."""
    bad = tmp / "run"
    shutil.copytree(w.run, bad)
    shutil.rmtree(bad / "a" / "fold_0")
    (bad / "a" / "fold_0").symlink_to(w.run / "a" / "fold_0", target_is_directory=True)
    return {"bad": bad}


def fold_path_link(w, tmp):
    """A run copy whose fold 0 "path" is a link inside the run to another run's fold."""
    bad = tmp / "run"
    shutil.copytree(w.run, bad)
    (bad / "elsewhere").symlink_to(w.run / "b" / "fold_0", target_is_directory=True)
    spec = json.loads((bad / "ensemble.json").read_text())
    spec["members"][0]["folds"][0]["path"] = "elsewhere"
    (bad / "ensemble.json").write_text(json.dumps(spec))
    return {"bad": bad}


def _shard_file(value):
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "dataset.json").read_text())
        meta["splits"]["test"]["shards"][0]["file"] = value
        (folder / "dataset.json").write_text(json.dumps(meta))
    return shards_with(edit)


def shard_symlinked_out(w, tmp):
    """A shard folder copy whose test-000.h5 is a link to the other data's shard."""
    bad = tmp / "shards"
    shutil.copytree(w.shards, bad)
    (bad / "test-000.h5").unlink()
    (bad / "test-000.h5").symlink_to(w.other / "test-000.h5")
    return {"bad": bad}


def fold_folder_with(edit):
    """A copy of the world run; {bad} is its a/fold_0 folder after `edit(fold folder)`."""
    def setup(w, tmp):
        run = tmp / "run"
        shutil.copytree(w.run, run)
        edit(run / "a" / "fold_0")
        return {"bad": run / "a" / "fold_0"}
    return setup


def _done_epochs_text(fold: Path) -> None:
    done = json.loads((fold / "done.json").read_text())
    (fold / "done.json").write_text(json.dumps({**done, "epochs": "many"}))


def _swap_weights(fold: Path) -> None:
    shutil.copyfile(fold.parent.parent / "b/fold_1/model.safetensors", fold / "model.safetensors")


def link_to(target: str, name: str = "link.csv"):
    """{bad}: a symbolic link in the row's folder to `target` (formatted with the world)."""
    def setup(w, tmp):
        (tmp / name).symlink_to(target.format(**{k: str(v) for k, v in vars(w).items()}))
        return {"bad": tmp / name}
    return setup


def _rehash(folder: Path) -> None:
    info = json.loads((folder / "dataset.json").read_text())
    for split in info["splits"].values():
        for s in split["shards"]:
            s["sha256"] = hashlib.sha256((folder / s["file"]).read_bytes()).hexdigest()
    (folder / "dataset.json").write_text(json.dumps(info))


def shard_claiming_rows(split: str, key: str = "masks", n: int = 10**9):
    """Shards whose first `split` shard has a `key` dataset of `n` rows (chunked, never
    written: a small file), rehashed into dataset.json as a hostile writer would."""
    def edit(folder: Path) -> None:
        with h5py.File(folder / f"{split}-000.h5", "r+") as f:
            del f[key]
            f.create_dataset(key, shape=(n, 64, 128), dtype="u1", chunks=(1, 64, 128))
        _rehash(folder)
    return shards_with(edit)

def teacher(edit=None, shards_edit=None, **kw):
    """A planted teacher run folder on the world's shards (`make_teacher(**kw)`; by default
    with the folds of RECIPE, k = 2, seed 1; `edit(teacher)` applied), a student recipe, and
    with `shards_edit` a copy of the shards edited so."""
    def setup(w, tmp):
        (tmp / "student.toml").write_text(STUDENT)
        t = make_teacher(tmp / "teacher", w.shards, **{"split_seed": 1, **kw})
        if edit:
            edit(t)
        (tmp / "ib.toml").write_text(RECIPE + "[members.loss]\nignore_background = true\n")
        (tmp / "off.toml").write_text(RECIPE.replace("epochs = 1", "epochs = 1\npseudo_labels"
                                                     " = false"))
        out = {"teacher": t, "student": tmp / "student.toml", "bad": w.shards,
               "ib": tmp / "ib.toml", "off": tmp / "off.toml"}
        if shards_edit:
            out["bad"] = _copy_with("shards", shards_edit)(w, tmp)["bad"]
        return out
    return setup


def _swap_fold_ids(t: Path) -> None:
    """The teacher's splits with one validation id of fold 0 and one of fold 1 swapped."""
    d = json.loads((t / "splits.json").read_text())
    f0, f1 = d["folds"]
    a, b = f0["val_ids"][0], f1["val_ids"][0]
    f0["val_ids"][0], f1["val_ids"][0] = b, a
    f0["train_ids"], f1["train_ids"] = ([a if i == b else i for i in f0["train_ids"]],
                                        [b if i == a else i for i in f1["train_ids"]])
    (t / "splits.json").write_text(json.dumps(d))


def _drop_fold(fold: int):
    """A teacher trained with --folds: member a lacks `fold` in its ensemble file."""
    def edit(t: Path) -> None:
        d = json.loads((t / "ensemble.json").read_text())
        d["members"][0]["folds"] = [f for f in d["members"][0]["folds"] if f["fold"] != fold]
        (t / "ensemble.json").write_text(json.dumps(d))
    return edit


def _student_with_older_targets(w, tmp) -> dict:
    """`teacher()`'s setup plus a student run folder {tmp}/s whose targets.h5 holds the
    whole ensemble's unlabeled targets only (an older layout: no unlabeled_folds)."""
    from marsseg._io import sha256_file
    from marsseg.device import resolve
    from marsseg.folds import load_train
    from marsseg.runfolder import data_fingerprint
    from marsseg.teacher import open_teacher, write_targets

    out = teacher()(w, tmp)
    (tmp / "s").mkdir()
    path = tmp / "s" / "targets.h5"
    write_targets(open_teacher(out["teacher"], data_fingerprint(w.shards)), w.shards,
                  load_train(w.shards), path, unlabeled="test", rt=resolve(None, "no"),
                  dataset_sha256=sha256_file(w.shards / "dataset.json"))
    with h5py.File(path, "r+") as f:
        rec = json.loads(f.attrs["record"])
        del rec["unlabeled_folds"]
        f.attrs["record"] = json.dumps(rec)
    return out


TEACHER = ["train-folds", "--data", "{bad}", "--recipe", "{ib}", "--out", "{tmp}/run",
           "--sequential", "--teacher", "{teacher}"]
DISTILL = ["distill", "--ensemble", "{teacher}", "--data", "{bad}", "--out", "{tmp}/s",
           "--recipe", "{student}"]

ZEROS = np.zeros((3, 64, 128), np.uint8)


def row(id, argv, setup=None, names=""):
    return pytest.param(argv, setup, names, id=id)


# ----------------------------------------------------------------------------- the table

ROWS = [
    # click/typer's own usage errors, in our one-line form
    row("cli-unknown-command", ["nope"], None, "No such command 'nope'"),
    row("cli-missing-option", ["predict", "--data", "{shards}", "--out", "{tmp}/s.csv"],
        None, "--ensemble"),
    row("cli-bad-int", ["synth", "--out", "{tmp}/s.npz", "--n-train", "many"], None, "--n-train"),
    row("cli-unknown-option", ["evaluate", "--ensemble", "{run}", "--data", "{shards}", "--bogus"],
        None, "--bogus"),
    row("cli-option-without-value", ["prepare", "--data", "{npz}", "--out", "{tmp}/s", "--shard-size"], None,
        "--shard-size"),
    row("cli-below-min", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                          "--out", "{tmp}/s.csv", "--batch-size", "0"], None, "--batch-size"),
    # synth
    row("synth-negative-seed", ["synth", "--out", "{tmp}/s.npz", "--seed", "-1"], None, "--seed"),
    row("synth-no-train", ["synth", "--out", "{tmp}/s.npz", "--n-train", "0"], None, "--n-train"),
    row("synth-no-test", ["synth", "--out", "{tmp}/s.npz", "--n-test", "0"], None, "--n-test"),
    row("synth-too-many-outliers", ["synth", "--out", "{tmp}/s.npz", "--n-train", "10", "--n-outliers", "11"],
        None, "--n-outliers"),
    row("synth-out-is-folder", ["synth", "--out", "{tmp}"], None, "{tmp}"),
    # prepare
    row("prepare-missing-file", ["prepare", "--data", "{tmp}/nope.npz", "--out", "{tmp}/s"], None, "{tmp}/nope.npz"),
    row("prepare-text-file", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        file_with(b"id,label\n1,2\n", "t.npz"), "not a zip"),
    row("prepare-npy", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        file_with(b"\x93NUMPY\x01\x00", "a.npz"), ".npy"),
    row("prepare-missing-key", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"], npz_with(training_set=None),
        "training_set"),
    row("prepare-label-7", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        npz_with(training_set=lambda a: np.where(np.arange(2)[None, :, None, None] == 1, 7,
                                                 a["training_set"]).astype(np.uint8)),
        "label value 7"),
    row("prepare-empty-test-set", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        npz_with(test_set=ZEROS[:0], test_masks=None), "'test_set' holds no images"),
    row("prepare-bool-arrays", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        npz_with(test_set=ZEROS.astype(bool), test_masks=None), "dtype bool"),
    row("prepare-missing-test-set", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        npz_with(test_set=None, test_masks=None), "test_set"),
    row("prepare-pixel-300", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        npz_with(test_set=np.full((3, 64, 128), 300, np.int16), test_masks=None),
        "pixel value 300"),
    row("prepare-fractional-pixels", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        npz_with(test_set=np.full((3, 64, 128), 12.5), test_masks=None), "12.5"),
    row("prepare-nan-pixels", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        npz_with(test_set=np.full((3, 64, 128), np.nan), test_masks=None), "NaN"),
    row("prepare-shard-size-0", ["prepare", "--data", "{npz}", "--out", "{tmp}/s", "--shard-size", "0"], None,
        "--shard-size"),
    row("prepare-out-exists", ["prepare", "--data", "{npz}", "--out", "{bad}"], existing_folder, "already exists"),
    row("prepare-force-foreign-folder", ["prepare", "--data", "{npz}", "--out", "{bad}", "--force"], existing_folder,
        "no dataset.json"),
    row("prepare-max-background", ["prepare", "--data", "{npz}", "--out", "{tmp}/s", "--max-background", "1.5"],
        None, "--max-background"),
    # inspect
    row("inspect-missing", ["inspect", "--data", "{tmp}/nope"], None, "{tmp}/nope"),
    row("inspect-not-shards", ["inspect", "--data", "{tmp}"], None, "no dataset.json"),
    row("inspect-bad-dataset-json", ["inspect", "--data", "{bad}"],
        shards_with(lambda d: (d / "dataset.json").write_text("{oops")), "dataset.json"),
    row("inspect-max-background", ["inspect", "--data", "{shards}", "--max-background", "-0.1"], None,
        "--max-background"),
    # train-folds (all stop before Ray and before writing the run folder)
    row("train-recipe-missing", ["train-folds", "--data", "{shards}", "--recipe", "{tmp}/no.toml",
                                 "--out", "{tmp}/run", "--sequential"], None, "{tmp}/no.toml"),
    row("train-recipe-not-toml", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                  "--out", "{tmp}/run", "--sequential"],
        recipe_with("folds = = 2"), "not valid TOML"),
    row("train-recipe-unknown-key", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                     "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE.replace("epochs = 1", "epochs = 1\ncolour = 3")), "members[0].colour"),
    row("train-recipe-zero-loss", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                   "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE + "[members.loss]\nterms = { ce = 0.0 }\n"), "members[0].loss.terms"),
    row("train-recipe-wrong-type", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                    "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE.replace("epochs = 1", 'epochs = "one"')), "members[0].epochs"),
    row("train-recipe-unknown-model", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                       "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE.replace('name = "unet"', 'name = "vit"')), "unknown model 'vit'"),
    row("train-recipe-unknown-loss-term", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                           "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE + "[members.loss]\nterms = { ce = 1.0, lovasz_hinge = 1.0 }\n"),
        "members[0].loss.terms.lovasz_hinge"),
    row("train-recipe-class-weights-length", ["train-folds", "--data", "{shards}", "--recipe",
                                              "{bad}", "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE + "[members.loss]\nclass_weights = [0, 1, 1, 4]\n"),
        "members[0].loss.class_weights"),
    row("train-recipe-class-scale-negative", ["train-folds", "--data", "{shards}", "--recipe",
                                              "{bad}", "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE + "[members.loss]\nclass_scale = [1, 1, 1, 1, -2]\n"),
        "members[0].loss.class_scale[4]"),
    row("train-recipe-sampling-unknown-key", ["train-folds", "--data", "{shards}", "--recipe",
                                              "{bad}", "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE + "[members.sampling]\nclass_balanced = 4\n"),
        "members[0].sampling.class_balanced"),
    row("train-recipe-sampling-factor", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                         "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE + "[members.sampling]\nfactor = 0\n"), "members[0].sampling.factor"),
    row("train-recipe-sampling-class", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                        "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE + "[members.sampling]\nrare_class = 0\nfactor = 2.0\n"),
        "members[0].sampling.rare_class"),
    row("train-recipe-file-name", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                   "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE, "ü.toml"), "file name"),
    row("train-fp16-on-cpu", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                              "--out", "{tmp}/run", "--precision", "fp16"],
        needs_cpu_only_torch, "fp16"),
    row("train-unknown-member", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                                 "--out", "{tmp}/run", "--members", "zz", "--sequential"],
        None, "'zz'"),
    row("train-fold-out-of-range", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                                    "--out", "{tmp}/run", "--folds", "7", "--sequential"],
        None, "fold 7"),
    row("train-log-with-unknown", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                                   "--out", "{tmp}/run", "--log-with", "tensorboard,neptune",
                                   "--sequential"], None, "unknown tracker 'neptune'"),
    row("train-log-with-empty", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                                 "--out", "{tmp}/run", "--log-with", ",", "--sequential"],
        None, "--log-with"),
    row("train-epochs-0", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                           "--out", "{tmp}/run", "--epochs", "0", "--sequential"], None, "--epochs"),
    row("train-time-budget-no-unit", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                                      "--out", "{tmp}/run", "--time-budget", "12", "--sequential"],
        None, "--time-budget"),
    row("train-time-budget-and-epochs", ["train-folds", "--data", "{shards}", "--recipe",
                                         "{recipe}", "--out", "{tmp}/run", "--time-budget", "2m",
                                         "--epochs", "3", "--sequential"], None, "--time-budget"),
    row("train-data-not-shards", ["train-folds", "--data", "{tmp}", "--recipe", "{recipe}",
                                  "--out", "{tmp}/run", "--sequential"], None, "dataset.json"),
    row("train-shard-label-9", ["train-folds", "--data", "{bad}", "--recipe", "{recipe}",
                                "--out", "{tmp}/run", "--sequential"],
        shards_with_label("train"), "{shard}: 'masks' has label value 9"),
    row("train-shard-edited", ["train-folds", "--data", "{bad}", "--recipe", "{recipe}",
                               "--out", "{tmp}/run", "--sequential"],
        shards_with_label("train", None, rehash=False), "{shard}: sha256 differs"),
    row("train-out-is-a-file", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                                "--out", "{recipe}", "--sequential"],
        None, "{recipe}: exists and is not a folder"),
    row("train-workers-batch-does-not-split", ["train-folds", "--data", "{shards}", "--recipe",
                                               "{recipe}", "--out", "{tmp}/run",
                                               "--workers-per-fold", "3"],
        None, "batch_size 4 does not split over --workers-per-fold 3"),
    row("train-gpus-per-task-above-1", ["train-folds", "--data", "{shards}", "--recipe",
                                        "{recipe}", "--out", "{tmp}/run", "--gpus-per-task", "2"],
        None, "--gpus-per-task 2: a fold's worker trains on one GPU"),
    # predict
    row("predict-no-run-folder", ["predict", "--ensemble", "{tmp}/none", "--data", "{shards}",
                                  "--out", "{tmp}/s.csv"], None, "{tmp}/none"),
    row("predict-no-ensemble-json", ["predict", "--ensemble", "{tmp}", "--data", "{shards}",
                                     "--out", "{tmp}/s.csv"], None, "ensemble.json"),
    row("predict-replaced-weights", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                     "--out", "{tmp}/s.csv"], run_with(_replace_weights),
        "{bad}/a/fold_0/model.safetensors"),
    row("predict-unknown-member", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                   "--out", "{tmp}/s.csv", "--members", "zz"], None, "zz"),
    row("predict-unknown-fold", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                 "--out", "{tmp}/s.csv", "--folds", "9"], None, "[9]"),
    row("predict-out-dir-missing", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                    "--out", "{tmp}/no/s.csv"], None, "{tmp}/no"),
    row("predict-device-tpu", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                               "--out", "{tmp}/s.csv", "--device", "tpu"], None, "--device 'tpu'"),
    row("predict-device-cuda-on-cpu-torch", ["predict", "--ensemble", "{run}", "--data",
                                             "{shards}", "--out", "{tmp}/s.csv", "--device", "cuda"],
        needs_cpu_only_torch, "--device cuda"),
    row("predict-images-64x64", ["predict", "--ensemble", "{run}", "--data", "{bad}",
                                 "--out", "{tmp}/s.csv"],
        npz_with(test_set=np.zeros((3, 64, 64), np.uint8), test_masks=None), "test_set"),
    row("predict-truncated-shard", ["predict", "--ensemble", "{run}", "--data", "{bad}",
                                    "--out", "{tmp}/s.csv"], shards_with(_truncate), "test-000.h5"),
    row("predict-classes", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                            "--out", "{tmp}/s.csv", "--classes", "some"], None, "'some'"),
    row("predict-fp16-on-cpu", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                "--out", "{tmp}/s.csv", "--precision", "fp16"],
        needs_cpu_only_torch, "fp16"),
    row("predict-unknown-backend", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                    "--out", "{tmp}/s.csv", "--backend", "fast"], None, "'fast'"),
    # evaluate (scores.json of the world's run must stay as it is)
    row("evaluate-unlabeled-test", ["evaluate", "--ensemble", "{run}", "--data", "{unlabeled}",
                                    "--split", "test"], None, "no masks"),
    row("evaluate-zero-images", ["evaluate", "--ensemble", "{run}", "--data", "{bad}"],
        shards_with(_empty_test_split), "holds no images"),
    row("evaluate-other-data-oof", ["evaluate", "--ensemble", "{run}", "--data", "{other}",
                                    "--split", "train"], None, "{other}"),
    row("evaluate-test-label-9", ["evaluate", "--ensemble", "{run}", "--data", "{bad}"],
        shards_with_label("test"), "{shard}: 'masks' has label value 9"),
    row("evaluate-device-tpu", ["evaluate", "--ensemble", "{run}", "--data", "{shards}",
                                "--device", "tpu"], None, "--device 'tpu'"),
    row("evaluate-unknown-backend", ["evaluate", "--ensemble", "{run}", "--data", "{shards}",
                                     "--backend", "fast"], None, "'fast'"),
    row("evaluate-unknown-split", ["evaluate", "--ensemble", "{run}", "--data", "{shards}",
                                   "--split", "val"], None, "'val'"),
    row("evaluate-no-splits-json", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}",
                                    "--split", "train"],
        run_with(lambda r: (r / "splits.json").unlink()), "splits.json"),
    row("evaluate-oof-of-fold-all", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}",
                                     "--split", "train"], run_with(_fold_all),
        "{bad}: a/fold_all was trained on every image"),
    # report
    row("report-out-parent-missing", ["report", "--ensemble", "{run}", "--out", "{tmp}/a/b"], None,
        "{tmp}/a"),
    row("report-no-run-folder", ["report", "--ensemble", "{tmp}/none", "--out", "{tmp}/r"], None,
        "{tmp}/none"),
    row("report-bad-scores-json", ["report", "--ensemble", "{bad}", "--out", "{tmp}/r"],
        run_with(lambda r: (r / "scores.json").write_text("{oops")), "scores.json"),
    row("report-other-data-oof", ["report", "--ensemble", "{run}", "--out", "{tmp}/r",
                                  "--data", "{other}", "--split", "train"], None, "{other}"),
    # select
    row("select-no-run-folder", ["select", "--run", "{tmp}/none", "--data", "{shards}"], None,
        "{tmp}/none"),
    row("select-no-ensemble-json", ["select", "--run", "{tmp}", "--data", "{shards}"], None,
        "ensemble.json"),
    row("select-data-not-shards", ["select", "--run", "{run}", "--data", "{tmp}"], None,
        "dataset.json"),
    row("select-max-steps-0", ["select", "--run", "{run}", "--data", "{shards}", "--max-steps", "0"],
        None, "--max-steps"),
    row("select-shard-label-9", ["select", "--run", "{run}", "--data", "{bad}"],
        shards_with_label("train"), "{shard}: 'masks' has label value 9"),
    row("select-weight-abc", ["select", "--run", "{bad}", "--data", "{shards}"],
        run_with(_weight('"abc"')), "members[0].weight"),
    row("predict-weight-nan", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                               "--out", "{tmp}/s.csv"], run_with(_weight("NaN")),
        "members[0].weight"),
    row("evaluate-weight-infinity", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}"],
        run_with(_weight("Infinity")), "members[0].weight"),
    row("predict-temperature-negative", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                         "--out", "{tmp}/s.csv"],
        run_with(_calibration({"applied": "ensemble", "temperature": -1.0})),
        "calibration.temperature"),
    row("evaluate-temperature-nan", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}"],
        run_with(_calibration({"applied": "ensemble", "temperature": float("nan")})),
        "calibration.temperature"),
    row("report-member-temperature-0", ["report", "--ensemble", "{bad}", "--data", "{shards}",
                                        "--out", "{tmp}/rep"],
        run_with(_calibration({"applied": "members", "members": {"a": 0}})),
        "calibration.members.a"),
    # every key of ensemble.json a reader relies on has its type checked (records.EnsembleSpec)
    row("evaluate-fold-epochs-text", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}"],
        _spec_edit(lambda s: s["members"][0]["folds"][0].update(epochs="5")),
        "{bad}/ensemble.json: members[0].folds[0].epochs"),
    row("select-member-oof-miou-nan", ["select", "--run", "{bad}", "--data", "{shards}"],
        _spec_edit(lambda s: s["members"][1].update(oof_miou=float("nan"))),
        "{bad}/ensemble.json: members[1].oof_miou"),
    row("calibrate-selection-not-an-object", ["calibrate", "--run", "{bad}", "--data", "{shards}"],
        _spec_edit(lambda s: s.update(selection=["a"])), "{bad}/ensemble.json: selection"),
    row("calibrate-no-run-folder", ["calibrate", "--run", "{tmp}/none"], None,
        "{tmp}/none: run folder does not exist"),
    row("calibrate-no-oof", ["calibrate", "--run", "{run}", "--data", "{shards}"], None,
        "{run}/a/fold_0/oof.h5: unreadable out-of-fold file"),
    row("evaluate-test-shard-edited", ["evaluate", "--ensemble", "{run}", "--data", "{bad}"],
        shards_with_label("test", None, rehash=False), "{shard}: sha256 differs"),
    # issue 19: names from ensemble.json and dataset.json stay inside their folder
    row("predict-member-name-dotdot", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                       "--out", "{tmp}/s.csv"],
        _member_name("../outside/a"), "members[0].name"),
    row("predict-member-name-absolute", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                         "--out", "{tmp}/s.csv"], _member_name("/etc"),
        "members[0].name"),
    row("select-member-name-dotdot", ["select", "--run", "{bad}", "--data", "{shards}"],
        _member_name("../outside/a"), "members[0].name"),
    row("evaluate-member-name-newline", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}"],
        _member_name("a\n"), "members[0].name"),
    row("report-member-name-dotdot", ["report", "--ensemble", "{bad}", "--out", "{tmp}/r"],
        _member_name(".."), "members[0].name"),
    row("predict-fold-path-dotdot", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                     "--out", "{tmp}/s.csv"], _fold_path("../run/a/fold_0"),
        "members[0].folds[0].path"),
    row("predict-fold-folder-symlink", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                        "--out", "{tmp}/s.csv"], fold_symlinked_to_world,
        "leads outside {bad}"),
    row("select-fold-folder-symlink", ["select", "--run", "{bad}", "--data", "{shards}"],
        fold_symlinked_to_world, "leads outside {bad}"),
    row("evaluate-fold-path-symlink", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}"],
        fold_path_link, "leads outside {bad}"),
    row("train-recipe-name-newline", ["train-folds", "--data", "{shards}", "--recipe", "{bad}",
                                      "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE.replace('name = "a"', 'name = "a\\n"')), "members[0].name"),
    row("predict-shard-file-dotdot", ["predict", "--ensemble", "{run}", "--data", "{bad}",
                                      "--out", "{tmp}/s.csv"],
        _shard_file("../other-shards/test-000.h5"), "dataset.json"),
    row("inspect-shard-file-absolute", ["inspect", "--data", "{bad}"],
        _shard_file("/etc/passwd"), "dataset.json"),
    row("evaluate-shard-file-not-a-string", ["evaluate", "--ensemble", "{run}", "--data", "{bad}"],
        _shard_file(7), "dataset.json"),
    row("predict-shard-symlink-outside", ["predict", "--ensemble", "{run}", "--data", "{bad}",
                                          "--out", "{tmp}/s.csv"], shard_symlinked_out,
        "leads outside {bad}"),
    # issue 19: every loaded artifact verified
    row("predict-fold-folder-replaced-weights", ["predict", "--ensemble", "{bad}", "--data",
                                                 "{shards}", "--out", "{tmp}/s.csv"],
        fold_folder_with(_swap_weights), "sha256 differs"),
    row("predict-fold-folder-no-done", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                        "--out", "{tmp}/s.csv"],
        fold_folder_with(lambda d: (d / "done.json").unlink()), "done.json"),
    row("predict-fold-folder-done-wrong-type", ["predict", "--ensemble", "{bad}", "--data",
                                                "{shards}", "--out", "{tmp}/s.csv"],
        fold_folder_with(_done_epochs_text), "done.json: malformed done file ('epochs'"),
    row("predict-no-sha256-key", ["predict", "--ensemble", "{bad}", "--data", "{shards}",
                                  "--out", "{tmp}/s.csv"], _spec_edit(_no_sha), "sha256"),
    row("evaluate-no-sha256-key", ["evaluate", "--ensemble", "{bad}", "--data", "{shards}"],
        _spec_edit(_no_sha), "sha256"),
    # issue 19: outputs never touch inputs
    row("predict-out-is-ensemble-json", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                         "--out", "{run}/ensemble.json"], None, "--out"),
    row("predict-out-is-weights", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                   "--out", "{run}/a/fold_0/model.safetensors"], None, "--out"),
    row("predict-out-is-dataset-json", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                        "--out", "{shards}/dataset.json"], None, "--out"),
    row("predict-probs-is-shard", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                   "--out", "{tmp}/s.csv", "--probs", "{shards}/test-000.h5"],
        None, "--probs"),
    row("predict-probs-equals-out", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                     "--out", "{tmp}/s.csv", "--probs", "{tmp}/s.csv"],
        None, "--probs is the same file as --out"),
    row("predict-out-link-to-ensemble-json", ["predict", "--ensemble", "{run}", "--data",
                                              "{shards}", "--out", "{bad}"],
        link_to("{run}/ensemble.json"), "--out"),
    row("predict-out-is-npz", ["predict", "--ensemble", "{run}", "--data", "{bad}",
                               "--out", "{bad}"], npz_with(), "--out"),
    row("predict-out-in-fold-folder", ["predict", "--ensemble", "{run}/a/fold_0", "--data",
                                       "{shards}", "--out", "{run}/a/fold_0/s.csv"], None, "--out"),
    row("predict-out-is-run-scores", ["predict", "--ensemble", "{run}", "--data", "{shards}",
                                      "--out", "{run}/scores.json"], None, "--out"),
    row("train-out-inside-shards", ["train-folds", "--data", "{shards}", "--recipe", "{recipe}",
                                    "--out", "{shards}/run", "--sequential"], None, "--out"),
    row("report-out-is-fold-folder", ["report", "--ensemble", "{run}", "--out", "{run}/a/fold_0"],
        None, "--out"),
    # issue 19: tracebacks that are one line now
    row("predict-shard-claims-1e9-rows", ["predict", "--ensemble", "{run}", "--data", "{bad}",
                                          "--out", "{tmp}/s.csv", "--backend", "eager"],
        shard_claiming_rows("test", "images"), "1000000000"),
    row("report-out-in-shards", ["report", "--ensemble", "{run}", "--out", "{shards}/r",
                                 "--data", "{shards}"], None, "--out"),
    # distill (all stop before the student's run folder is created)
    row("distill-teacher-without-oof", DISTILL,
        teacher(lambda t: (t / "a/fold_1/oof.h5").unlink()), "a/fold_1/oof.h5: missing"),
    row("distill-teacher-on-other-data", DISTILL[:4] + ["{other}"] + DISTILL[5:], teacher(),
        "{other}: not the data"),
    row("distill-empty-unlabeled-split", DISTILL + ["--unlabeled", "test"],
        teacher(shards_edit=_empty_test_split), "holds no images"),
    row("distill-unknown-unlabeled", DISTILL + ["--unlabeled", "gold"], teacher(), "'gold'"),
    row("distill-teacher-not-a-run", DISTILL,
        teacher(lambda t: (t / "ensemble.json").unlink()), "ensemble.json"),
    row("distill-teacher-without-data-record", DISTILL,
        teacher(lambda t: (t / "data.json").unlink()), "data.json"),
    row("distill-two-member-student", DISTILL, teacher(lambda t: (t.parent / "student.toml")
                                                       .write_text(STUDENT + RECIPE.split("\n", 2)[2])),
        "exactly one"),
    row("distill-epochs-and-budget", DISTILL + ["--epochs", "2", "--time-budget", "1m"],
        teacher(), "--time-budget"),
    row("distill-teacher-without-fold-0", DISTILL + ["--unlabeled", "test"],
        teacher(_drop_fold(0)), "teacher/ensemble.json: member 'a' has no fold 0 model(s); "
        "the fold 0 student's unlabeled images are taught by the teacher's fold 0 models only"),
    row("distill-rerun-on-whole-ensemble-unlabeled-targets", DISTILL + ["--unlabeled", "test"],
        _student_with_older_targets, "{tmp}/s/targets.h5: unlabeled targets of the teacher's "
        "whole ensemble only"),
    # train-folds --teacher
    row("train-teacher-on-other-data", TEACHER[:2] + ["{other}"] + TEACHER[3:], teacher(),
        "{other}: not the data"),
    row("train-teacher-background-not-ignored", TEACHER[:4] + ["{recipe}"] + TEACHER[5:],
        teacher(), "ignore_background"),
    row("train-teacher-empty-test-split", TEACHER, teacher(shards_edit=_empty_test_split),
        "holds no images"),
    row("train-teacher-missing", TEACHER[:-1] + ["{tmp}/nope"], teacher(), "{tmp}/nope"),
    row("train-teacher-other-split-seed", TEACHER, teacher(split_seed=0),
        "teacher/splits.json: the teacher's splits have seed 0, this run's seed 1"),
    row("train-teacher-other-k", TEACHER, teacher(k=3),
        "teacher/splits.json: the teacher's splits have k=3, this run's k=2"),
    row("train-teacher-other-fold-assignment", TEACHER, teacher(_swap_fold_ids),
        "teacher/splits.json: 2 image(s) are in another fold"),
    row("train-teacher-without-fold", TEACHER, teacher(_drop_fold(1)),
        "member 'a' has no fold 1 model(s)"),
    row("train-teacher-every-member-without-pseudo-labels", TEACHER[:4] + ["{off}"] + TEACHER[5:],
        teacher(), "--teacher: every member has pseudo_labels = false"),
    row("train-recipe-pseudo-labels-not-bool", ["train-folds", "--data", "{shards}", "--recipe",
                                                "{bad}", "--out", "{tmp}/run", "--sequential"],
        recipe_with(RECIPE.replace("epochs = 1", 'epochs = 1\npseudo_labels = "no"')),
        "members[0].pseudo_labels"),
]


# ----------------------------------------------------------------------------- resources and contracts (issue 19)


def _npz_claiming_rows(key: str, rows: int):
    """The world's npz with `key`'s .npy header edited to claim `rows` rows (data unchanged)."""
    import zipfile

    def setup(w, tmp):
        with zipfile.ZipFile(w.npz) as zin, zipfile.ZipFile(tmp / "bad.npz", "w") as zout:
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename == key + ".npy":
                    with np.load(w.npz) as z:
                        old = z[key].shape[0]
                    data = data.replace(f"'shape': ({old},".encode(),
                                        f"'shape': ({rows},".encode(), 1)
                zout.writestr(info.filename, data)
        return {"bad": tmp / "bad.npz"}
    return setup


def _shard_claiming_rows(split: str, dataset: str, rows: int = 10**9):
    """Shards whose first `split` shard's `dataset` claims `rows` rows (chunked, never
    allocated: the file stays small), its sha256 in dataset.json updated to match."""
    def setup(w, tmp):
        bad = tmp / "shards"
        shutil.copytree(w.shards, bad)
        with h5py.File(bad / f"{split}-000.h5", "r+") as f:
            del f[dataset]
            f.create_dataset(dataset, shape=(rows, 64, 128), dtype="u1", chunks=(1, 64, 128))
        info = json.loads((bad / "dataset.json").read_text())
        for s in info["splits"][split]["shards"]:
            s["sha256"] = hashlib.sha256((bad / s["file"]).read_bytes()).hexdigest()
        (bad / "dataset.json").write_text(json.dumps(info))
        return {"bad": bad, "shard": bad / f"{split}-000.h5"}
    return setup


_HELD: list[int] = []  # folder locks a row's setup holds while the command runs


def _shards_locked(shared: bool):
    """A copy of the shards that another process reads (shared) or replaces (exclusive):
    the row's setup holds that lock on the folder, as a running command would."""
    import fcntl
    import os

    def setup(w, tmp):
        bad = tmp / "shards"
        shutil.copytree(w.shards, bad)
        fd = os.open(bad, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        _HELD.append(fd)
        return {"bad": bad}
    return setup


def _train(recipe: str = "{bad}", *extra: str, data: str = "{shards}") -> list[str]:
    return ["train-folds", "--data", data, "--recipe", recipe, "--out", "{tmp}/run", *extra]


def _reuse_run(recipe: str):
    """A folder beside the row's --out holding only a recipe.toml (a --reuse candidate)."""
    def setup(w, tmp):
        (tmp / "old").mkdir()
        (tmp / "old" / "recipe.toml").write_text(recipe)
        return {"old": tmp / "old"}
    return setup


REUSE = ["--sequential", "--reuse"]


def _predict(*extra: str, data: str = "{shards}") -> list[str]:
    return ["predict", "--ensemble", "{run}", "--data", data, "--out", "{tmp}/s.csv", *extra]


ROWS += [
    # recipes: the whole recipe is checked before the run folder is written
    row("train-member-name-300-chars", _train(),
        recipe_with(RECIPE.replace('name = "a"', f'name = "{"a" * 300}"')),
        "members[0].name: 'aaaaaaaaaaaaaaaaaaaa'... is not a valid name: 300 characters"),
    row("train-member-name-newline", _train(), recipe_with(RECIPE.replace('name = "a"', 'name = "a\\n"')),
        "members[0].name"),
    row("train-recipe-name-too-long", _train(), recipe_with(f'name = "{"r" * 101}"\n' + RECIPE),
        "name: 'rrrrrrrrrrrrrrrrrrrr'... is not a valid name: 101 characters"),
    row("train-lr-inf", _train(), recipe_with(RECIPE + "[members.optimizer]\nlr = inf\n"),
        "members[0].optimizer.lr: must be a finite number"),
    row("train-brightness-nan", _train(), recipe_with(RECIPE + "[members.augment]\nbrightness = nan\n"),
        "members[0].augment.brightness: must be a finite number"),
    row("train-address-garbage", _train("{recipe}", "--address", "garbage:1"), None,
        "--address garbage:1"),
    row("train-address-no-port", _train("{recipe}", "--address", "somewhere"), None,
        "--address 'somewhere'"),
    row("train-shard-claims-1e9-rows", _train("{recipe}", "--sequential", data="{bad}"),
        _shard_claiming_rows("train", "masks"), "{shard}: dataset 'masks' has 1000000000 rows"),
    row("train-shards-being-replaced", _train("{recipe}", "--sequential", data="{bad}"),
        _shards_locked(shared=False), "being replaced by `prepare --force`"),
    # train-folds --reuse: every run folder named is read before OUT is written
    row("train-reuse-missing", _train("{recipe}", *REUSE, "{tmp}/nope"), None,
        "--reuse {tmp}/nope: no such run folder"),
    row("train-reuse-not-a-run-folder", _train("{recipe}", *REUSE, "{run}"), None,
        "--reuse {run}: not a train-folds run folder (no recipe.toml)"),
    row("train-reuse-out-itself", _train("{recipe}", *REUSE, "{tmp}/run"), None,
        "--reuse {tmp}/run: is --out itself"),
    row("train-reuse-recipe-not-toml", _train("{recipe}", *REUSE, "{old}"), _reuse_run("[["),
        "{old}/recipe.toml: unreadable recipe"),
    row("train-reuse-without-data-record", _train("{recipe}", *REUSE, "{old}"),
        _reuse_run(RECIPE), "--reuse {old}: not a train-folds run folder (data.json is missing)"),
    # synth, prepare, inspect: resource bombs are one line
    row("synth-a-billion-images", ["synth", "--out", "{tmp}/s.npz", "--n-train", "1000000000"],
        None, "--n-train 1000000000"),
    row("prepare-npz-claims-1e9-rows", ["prepare", "--data", "{bad}", "--out", "{tmp}/s"],
        _npz_claiming_rows("training_set", 10**9), "'training_set' is truncated or corrupt"),
    row("inspect-npz-claims-1e9-rows", ["inspect", "--data", "{bad}"],
        _npz_claiming_rows("test_masks", 10**9), "'test_masks' is truncated or corrupt"),
    row("prepare-force-while-read", ["prepare", "--data", "{npz}", "--out", "{bad}", "--force"],
        _shards_locked(shared=True), "is being read by a running command"),
    # predict / evaluate / report: options with a sane range
    row("predict-npz-claims-1e9-rows", _predict(data="{bad}"),
        _npz_claiming_rows("test_set", 10**9), "'test_set' is truncated or corrupt"),
    row("predict-batch-size-1e6", _predict("--batch-size", "1000000"), None,
        "--batch-size 1000000: must be 1..1024"),
    row("evaluate-batch-size-5000", ["evaluate", "--ensemble", "{run}", "--data", "{shards}",
                                     "--batch-size", "5000"], None, "--batch-size 5000"),
    row("report-batch-size-5000", ["report", "--ensemble", "{run}", "--out", "{tmp}/r",
                                   "--batch-size", "5000"], None, "--batch-size 5000"),
    row("predict-device-cpu-7", _predict("--device", "cpu:7"), None, "--device cpu:7"),
    row("evaluate-device-cpu-7", ["evaluate", "--ensemble", "{run}", "--data", "{shards}",
                                  "--device", "cpu:7"], None, "--device cpu:7"),
    row("predict-precision-unknown", _predict("--precision", "half"), None,
        "--precision: unknown value 'half'"),
    row("predict-address-garbage", _predict("--workers", "2", "--address", "garbage:1"), None,
        "--address garbage:1"),
    row("predict-shards-being-replaced", _predict(data="{bad}"), _shards_locked(shared=False),
        "being replaced by `prepare --force`"),
    row("evaluate-test-masks-claim-1e9-rows", ["evaluate", "--ensemble", "{run}", "--data", "{bad}"],
        _shard_claiming_rows("test", "masks"), "{shard}: dataset 'masks' has 1000000000 rows"),
]


def snapshot(*roots: Path) -> dict:
    """Every file under `roots` with its size and mtime, and every folder."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            out[str(p)] = "dir" if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("argv, setup, names", ROWS)
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, argv, setup, names):
    tmp = tmp_path / "row"
    tmp.mkdir()
    paths = {k: str(v) for k, v in vars(world).items()}
    paths["tmp"] = str(tmp)
    if setup is not None:
        paths.update({k: str(v) for k, v in setup(world, tmp).items()})
    args = [a.format(**paths) for a in argv]
    before = snapshot(world.base, tmp)

    res = runner.invoke(app, args)

    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), res.stderr
    assert names.format(**paths) in lines[0], lines[0]
    assert snapshot(world.base, tmp) == before, "a file was created, changed or left behind"


def test_the_table_covers_every_command():
    commands = {p.values[0][0] for p in ROWS}
    assert {"synth", "prepare", "inspect", "train-folds", "predict", "evaluate", "report",
            "select", "calibrate", "distill"} <= commands
    assert len(ROWS) >= 40


def test_the_installed_entry_point_gives_the_same_one_line(tmp_path, real_cli):
    """The same contract through a real process (no CliRunner): a usage error and --version."""
    r = real_cli.run(["predict", "--data", tmp_path])
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: ") and "Missing option '--ensemble'" in line, line
    r = real_cli.run(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("marsseg-cli ") and r.stderr == ""
