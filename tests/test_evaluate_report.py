"""evaluate (scores per fold / ensemble / ensemble+TTA, test and out-of-fold) and report PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _runfolder import make_npz, make_run
from typer.testing import CliRunner

from marsseg import ensemble as L
from marsseg import inference as PR
from marsseg.cli import app
from marsseg.evaluate import evaluate
from marsseg.metrics import confusion_matrix, course_miou
from marsseg.report import report

runner = CliRunner()
CFG = PR.PredictConfig(precision="no", batch_size=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalrep")
    npz = make_npz(d / "labeled.npz", n_train=8, n_test=9, test_masks=True)
    run = make_run(d / "run", metrics=True)
    folds = [{"fold": 0, "val_ids": [0, 1, 2, 3], "train_ids": [4, 5, 6, 7]},
             {"fold": 1, "val_ids": [4, 5, 6, 7], "train_ids": [0, 1, 2, 3]}]
    (run / "splits.json").write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))
    return {"dir": d, "npz": npz, "run": run}


def _score(labels, masks):
    return course_miou(confusion_matrix(labels, masks))


def test_evaluate_test_split_matches_direct_scoring(world):
    res = evaluate(world["run"], world["npz"], cfg=CFG)
    names = [r["name"] for r in res["rows"]]
    assert names == ["a/fold_0", "a/fold_1", "b/fold_0", "b/fold_1", "ensemble", "ensemble+tta"]
    assert res["mode"] == "test" and res["images"] == 9
    with np.load(world["npz"]) as z:
        x, m = z["test_set"], z["test_masks"]
    ens = L.load_ensemble(world["run"])
    full = PR.Predictor(ens, CFG)(np.arange(9), x).labels
    plain = PR.Predictor(ens, PR.PredictConfig(tta=False, precision="no", batch_size=4))
    assert res["rows"][-1]["miou"] == pytest.approx(_score(full, m), abs=1e-6)
    assert res["rows"][-2]["miou"] == pytest.approx(_score(plain(np.arange(9), x).labels, m),
                                                    abs=1e-6)
    one = L.load_ensemble(world["run"], members=["b"], folds=[1])
    fold_plain = PR.Predictor(one, PR.PredictConfig(tta=False, precision="no"))(np.arange(9), x)
    assert res["rows"][3]["miou"] == pytest.approx(_score(fold_plain.labels, m), abs=1e-6)
    assert "miou_tta" in res["rows"][0]
    for r in res["rows"]:
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_accuracy"] <= 1 and len(r["iou"]) == 5
    saved = json.loads((world["run"] / "scores.json").read_text())
    assert saved["rows"] == res["rows"]
    assert not [p for p in world["run"].iterdir() if ".tmp-" in p.name]
    assert len(saved["per_image"]["ids"]) == 9
    assert np.array(saved["confusion"]).sum() == 9 * 64 * 128


def test_evaluate_out_of_fold(world):
    res = evaluate(world["run"], world["npz"], cfg=CFG, split="train", write=False)
    assert res["mode"] == "oof"
    by = {r["name"]: r for r in res["rows"]}
    assert by["a/fold_0"]["images"] == 4 and by["b/fold_1"]["images"] == 4
    assert by["ensemble+tta"]["images"] == 8
    # the OOF ensemble of image 5 is the weighted average of the fold-1 models only
    with np.load(world["npz"]) as z:
        x, m = z["training_set"][:, 0], z["training_set"][:, 1]
    f1 = PR.Predictor(L.load_ensemble(world["run"], folds=[1]), CFG)(np.arange(4, 8), x[4:])
    f0 = PR.Predictor(L.load_ensemble(world["run"], folds=[0]), CFG)(np.arange(4), x[:4])
    want = _score(np.concatenate([f0.labels, f1.labels]), m)
    assert by["ensemble+tta"]["miou"] == pytest.approx(want, abs=1e-6)


def test_evaluate_labeled_shards_no_tta(world, shards):
    res = evaluate(world["run"], shards, cfg=PR.PredictConfig(tta=False, precision="no",
                                                             batch_size=16), write=False)
    assert [r["name"] for r in res["rows"]][-1] == "ensemble" and res["images"] == 40


def test_cli_evaluate(world):
    r = runner.invoke(app, ["evaluate", "--ensemble", str(world["run"]), "--data",
                            str(world["npz"]), "--precision", "no", "-q"])
    assert r.exit_code == 0, r.output
    assert "ensemble+tta" in r.output and "scores.json" in r.output


def test_evaluate_unlabeled_test_is_exit_2(world):
    npz = make_npz(world["dir"] / "unlabeled.npz", n_train=4, n_test=3)
    r = runner.invoke(app, ["evaluate", "--ensemble", str(world["run"]), "--data", str(npz),
                            "--split", "test", "-q"])
    assert r.exit_code == 2 and "no masks" in r.output
    assert len(r.output.strip().splitlines()) == 1


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_with_data(world, tmp_path):
    out = tmp_path / "rep"
    res = report(world["run"], out, data=world["npz"], cfg=CFG, n_overlays=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["confusion.png", "iou.png", "overlays_best.png", "overlays_worst.png",
                     "reliability.png", "training_curves.png"]
    assert all(_is_png(out / n) for n in names)
    assert len(res["files"]) == 6


def test_report_oof_and_from_scores_json(world, tmp_path):
    report(world["run"], tmp_path / "oof", data=world["npz"], cfg=CFG, split="train",
           n_overlays=1)
    assert (tmp_path / "oof" / "overlays_worst.png").is_file()
    r = runner.invoke(app, ["report", "--ensemble", str(world["run"]), "--out",
                            str(tmp_path / "rep"), "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "confusion.png", "iou.png", "reliability.png", "training_curves.png"]


def test_report_bad_out_is_exit_2(world, tmp_path):
    r = runner.invoke(app, ["report", "--ensemble", str(world["run"]), "--out",
                            str(tmp_path / "no" / "rep"), "-q"])
    assert r.exit_code == 2 and "does not exist" in r.output
