"""train_one_fold: artifacts, reload, resume after an interruption, determinism, precision errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from marsseg.config import ScheduleConfig, parse_recipe
from marsseg.data import load_split
from marsseg.errors import InputError
from marsseg.folds import ensure_splits, fold_rows
from marsseg.models.registry import load_pretrained
from marsseg.optim import lr_at
from marsseg.train import train_one_fold

ARTIFACTS = ("model.safetensors", "config.json", "metrics.jsonl", "oof.h5", "done.json",
             "state/trainer.json", "state/model.safetensors", "state/optimizer.bin")


def tiny_recipe(epochs: int = 2, **member) -> object:
    m = {"name": "tiny", "epochs": epochs, "batch_size": 16,
         "model": {"name": "unet-se", "args": {"base_width": 4, "depth": 2}},
         "loss": {"class_weights": "inverse_sqrt", "ignore_background": True},
         "augment": {"hflip": 0.5, "cutmix": 0.5, "rock_target": 0.05},
         "schedule": {"name": "cosine", "warmup_epochs": 1},
         "filters": {"max_background": 0.8, "skip_outliers": True}}
    m.update(member)
    return parse_recipe({"folds": 2, "seed": 3, "members": [m]}, name="tiny")


class Interrupt(Exception):
    pass


def stop_after(epoch: int):
    def progress(ev):
        if ev.event == "epoch" and ev.epoch == epoch:
            raise Interrupt
    return progress


def metrics(fold_dir):
    return [json.loads(x) for x in (fold_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_at():
    s = ScheduleConfig(name="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    assert lr_at(s, 1.0, 0, 10, 5) == pytest.approx(0.1)
    assert lr_at(s, 1.0, 9, 10, 5) == pytest.approx(1.0)
    assert lr_at(s, 1.0, 10, 10, 5) == pytest.approx(1.0)
    assert lr_at(s, 1.0, 50, 10, 5) == pytest.approx(0.1)
    step = ScheduleConfig(name="step", step_epochs=2, gamma=0.5)
    assert [lr_at(step, 1.0, e * 10, 10, 6) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    plateau = ScheduleConfig(name="plateau")
    assert lr_at(plateau, 2.0, 99, 10, 5, plateau_scale=0.1) == pytest.approx(0.2)
    assert lr_at(ScheduleConfig(), 3.0, 7, 10, 5) == 3.0


def test_filters_apply_to_training_rows_only(shards, tmp_path):
    r = tiny_recipe()
    split = load_split(shards, "train")
    splits = ensure_splits(r, split, tmp_path)
    train, val, n_filtered = fold_rows(split, splits, 0, r.members[0])
    assert sorted(split.ids[val].tolist()) == sorted(splits["folds"][0]["val_ids"])
    assert n_filtered > 0 and not split.outlier[train].any()
    assert (split.bg_fraction[train] <= 0.8).all()
    assert split.outlier[val].any() or (split.bg_fraction[val] > 0.8).any()  # val keeps them
    with pytest.raises(InputError, match="k=3"):
        ensure_splits(parse_recipe({"folds": 3, "seed": 3, "members": [
            {"name": "t", "model": {"name": "unet"}}]}, name="x", check_models=False), split, tmp_path)


def test_smoke_writes_every_artifact_and_reloads(shards, tmp_path):
    r = tiny_recipe()
    done = train_one_fold(r, "tiny", 1, shards, tmp_path, threads=1, precision="bf16")
    d = tmp_path / "tiny" / "fold_1"
    for name in ARTIFACTS:
        assert (d / name).is_file(), name
    rows = metrics(d)
    assert [x["epoch"] for x in rows] == [0, 1]
    for x in rows:
        assert {"loss", "val_miou", "val_iou", "lr", "img_s", "seconds"} <= set(x)
        assert len(x["val_iou"]) == 5 and x["img_s"] > 0
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["member"] == "tiny" and cfg["fold"] == 1 and cfg["recipe"] == "tiny"
    assert cfg["val_miou"] == done.val_miou == max(x["val_miou"] for x in rows)
    model = load_pretrained(d)
    assert model(torch.zeros(2, 1, 64, 128)).shape == (2, 5, 64, 128)
    splits = json.loads((tmp_path / "splits.json").read_text())
    with h5py.File(d / "oof.h5") as f:
        ids, probs = f["ids"][()], f["probs"][()]
    assert ids.tolist() == sorted(splits["folds"][1]["val_ids"])
    assert probs.dtype == np.float16 and probs.shape == (len(ids), 5, 64, 128)
    np.testing.assert_allclose(probs.astype(np.float32).sum(1), 1.0, atol=5e-3)
    # the OOF softmax kept from the best epoch's validation pass = the reloaded best weights'
    split = load_split(shards, "train")
    rows = [list(split.ids).index(i) for i in ids]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.from_numpy(split.images[rows]).unsqueeze(1).float()
        ref = torch.softmax(model(x).float(), dim=1).numpy()
    np.testing.assert_allclose(probs.astype(np.float32), ref, atol=1e-2)  # bf16, other batching
    assert done.n_val == len(ids) and done.precision == "bf16" and done.epochs_run == 2
    assert json.loads((d / "state" / "trainer.json").read_text())["epoch"] == 1

    # a finished fold is not trained again
    events = []
    again = train_one_fold(r, "tiny", 1, shards, tmp_path, progress=events.append)
    assert again == done and events == []


def test_resume_continues_from_saved_epoch_and_matches_uninterrupted(shards, tmp_path):
    r = tiny_recipe(epochs=3)
    whole = train_one_fold(r, "tiny", 0, shards, tmp_path / "a", threads=1, precision="no")

    with pytest.raises(Interrupt):
        train_one_fold(r, "tiny", 0, shards, tmp_path / "b", threads=1, precision="no",
                       progress=stop_after(1))
    d = tmp_path / "b" / "tiny" / "fold_0"
    assert not (d / "done.json").exists()
    assert [x["epoch"] for x in metrics(d)] == [0, 1]
    events = []
    resumed = train_one_fold(r, "tiny", 0, shards, tmp_path / "b", threads=1, precision="no",
                             progress=events.append)
    assert [e.epoch for e in events if e.event == "epoch"] == [2]
    assert events[0].event == "start" and events[0].resumed_from == 1
    rows = metrics(d)
    assert [x["epoch"] for x in rows] == [0, 1, 2] and rows[2].get("resumed") is True
    # every epoch is seeded, so the resumed fold retraces the uninterrupted one exactly
    a = load_file(str(tmp_path / "a" / "tiny" / "fold_0" / "model.safetensors"))
    b = load_file(str(d / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed.val_miou == whole.val_miou
    oof = [h5py.File(p / "tiny" / "fold_0" / "oof.h5")["probs"][()] for p in (tmp_path / "a", tmp_path / "b")]
    np.testing.assert_allclose(oof[0].astype(np.float32), oof[1].astype(np.float32), atol=1e-3)
    assert resumed.sha256 == whole.sha256


def test_threads_fn_is_asked_at_every_epoch_start(shards, tmp_path):
    asked = []

    def threads_fn():
        asked.append(torch.get_num_threads())
        return [2, 1, 2][len(asked) - 1]

    train_one_fold(tiny_recipe(epochs=3), "tiny", 0, shards, tmp_path, threads=1,
                   threads_fn=threads_fn)
    assert asked == [1, 2, 1]  # what ran before each poll
    assert [x["threads"] for x in metrics(tmp_path / "tiny" / "fold_0")] == [2, 1, 2]


def test_early_stopping_and_plateau(shards, tmp_path):
    r = tiny_recipe(epochs=6, patience=1, optimizer={"lr": 1e-9},
                    schedule={"name": "plateau", "plateau_patience": 1, "gamma": 0.5})
    done = train_one_fold(r, "tiny", 0, shards, tmp_path, threads=1, precision="no")
    rows = metrics(tmp_path / "tiny" / "fold_0")
    # lr 1e-9 cannot improve on epoch 0 except by noise: stop after one epoch without gain
    assert done.stopped_early and len(rows) < 6


def test_fp16_on_cpu_is_an_input_error(shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(InputError, match="GPU-only"):
        train_one_fold(tiny_recipe(), "tiny", 0, shards, tmp_path, precision="fp16")
    assert not (tmp_path / "tiny").exists()


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(shards, tmp_path):
    done = train_one_fold(tiny_recipe(epochs=1), "tiny", 0, shards, tmp_path, threads=1,
                          compile=True)
    d = tmp_path / "tiny" / "fold_0"
    for name in ("model.safetensors", "state/model.safetensors"):
        assert not [k for k in load_file(str(d / name)) if "_orig_mod" in k], name
    assert load_pretrained(d)(torch.zeros(1, 1, 64, 128)).shape == (1, 5, 64, 128)
    assert done.epochs_run == 1


def test_decay_norms_puts_every_parameter_in_the_decayed_group():
    from marsseg.config import OptimizerConfig
    from marsseg.models.registry import build_model
    from marsseg.optim import make_optimizer

    model = build_model("unet-se", base_width=4, depth=2)
    n = sum(1 for _ in model.parameters())
    opt = make_optimizer(OptimizerConfig(weight_decay=1e-4, decay_norms=False), model)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and len(plain["params"]) > 0
    opt = make_optimizer(OptimizerConfig(weight_decay=1e-4, decay_norms=True), model)
    assert len(opt.param_groups[0]["params"]) == n and not opt.param_groups[1]["params"]


def test_split_seed_keeps_the_split_while_the_training_seed_moves(shards, tmp_path):
    split = load_split(shards, "train")
    base = {"name": "tiny", "model": {"name": "unet", "args": {"base_width": 4, "depth": 2}}}
    a = parse_recipe({"folds": 2, "seed": 0, "members": [base]}, name="a")
    b = parse_recipe({"folds": 2, "seed": 5, "split_seed": 0, "members": [base]}, name="b")
    c = parse_recipe({"folds": 2, "seed": 5, "members": [base]}, name="c")
    sa = ensure_splits(a, split, tmp_path / "a")
    sb = ensure_splits(b, split, tmp_path / "b")
    sc = ensure_splits(c, split, tmp_path / "c")
    assert sa["folds"] == sb["folds"] and sb["seed"] == 0
    assert sc["folds"] != sa["folds"]
    with pytest.raises(InputError, match="seed=0"):
        ensure_splits(c, split, tmp_path / "a")
