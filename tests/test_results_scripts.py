"""results/: the round-2 table from the run folders, and run-real-mars.sh end to end on tiny data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from marsseg.synth import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "results" / "table.py"
SCRIPT = ROOT / "results" / "run-real-mars.sh"


def fake_lever(root: Path, recipe: str, member: str, folds: list[int], miou: float, rock: float,
               tag: str = "", left_scores: bool = True) -> None:
    """A run folder as train-folds + `run-real-mars.sh oof` leave it (no weights needed)."""
    run = root / recipe
    entries = []
    for f in folds:
        d = run / member / f"fold_{f}"
        d.mkdir(parents=True)
        (d / "done.json").write_text(json.dumps({"epochs": 40, "best_epoch": 30 + f,
                                                 "train_seconds": 600.0, "sha256": "x"}))
        entries.append({"fold": f, "path": f"{member}/fold_{f}", "val_miou": miou})
    (run / "ensemble.json").write_text(json.dumps({"members": [{"name": member, "folds": entries}]}))
    iou = [None, 0.8, 0.8, 0.5, rock]
    rows = [{"name": f"{member}/fold_{f}", "kind": "fold", "miou": miou, "iou": iou} for f in folds]
    rows += [{"name": "ensemble", "kind": "ensemble", "miou": miou - 0.01, "iou": iou},
             {"name": "ensemble+tta", "kind": "ensemble", "miou": miou, "iou": iou}]
    scores = {"mode": "oof", "members": [member], "rows": rows,
              "models": [f"{member}/fold_{f}" for f in folds]}
    (run / f"scores-oof{tag}.json").write_text(json.dumps(scores))
    if left_scores:  # an OOF scores.json left in place must never count as gold
        (run / "scores.json").write_text(json.dumps(scores))


def table(root: Path, *args: str, folds: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "ROOT": str(root), "FOLDS": folds}
    return subprocess.run([sys.executable, str(TABLE), *args], env=env, capture_output=True,
                          text=True)


def test_round2_table_prints_each_levers_oof_and_big_rock_against_the_base(tmp_path):
    fake_lever(tmp_path, "lever-e40", "res-ds-dice", [0, 1, 2], 0.70, 0.25, "-f012")
    fake_lever(tmp_path, "lever-sample", "res-ds-sample", [0, 1, 2], 0.71, 0.31, "-f012",
               left_scores=False)
    out = table(tmp_path, "round2", "lever-e40", "lever-sample", folds="0,1,2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("| recipe | member | folds |") and len(lines) == 4
    base, lever = (line.split(" | ") for line in lines[2:])
    assert base[:3] == ["| lever-e40", "res-ds-dice", "0,1,2"]
    assert base[4] == "30, 31, 32" and base[6] == "**70.00**" and base[9] == "**25.00**"
    assert lever[1] == "res-ds-sample" and lever[6] == "**71.00**" and lever[5] == "70.00"
    assert lever[7] == "+1.00" and lever[9] == "**31.00**" and lever[10] == "+6.00"
    assert lever[-1] == "30 |"  # 3 folds x 10 min
    # the `folds` table does not read the out-of-fold scores.json as gold
    out = table(tmp_path, "folds", "lever-e40")
    assert out.returncode == 0, out.stderr
    assert "| lever-e40 | – | – | **–** |" in out.stdout


def test_round2_table_refuses_levers_scored_on_other_folds(tmp_path):
    fake_lever(tmp_path, "lever-e40", "res-ds-dice", [0, 1, 2, 3, 4], 0.70, 0.25)
    fake_lever(tmp_path, "lever-focal", "res-ds-focal", [0, 1, 2], 0.69, 0.20)
    out = table(tmp_path, "round2", "lever-e40", "lever-focal")
    assert out.returncode != 0 and "same folds" in out.stderr
    out = table(tmp_path, "round2", "lever-e40", "lever-focal", folds="0,1,2")
    assert out.returncode != 0 and "scores-oof-f012.json: missing" in out.stderr


def test_distill_table_prints_teacher_its_hard_label_twin_and_each_student(tmp_path):
    iou = [None, 0.8, 0.9, 0.6, 0.2]

    def scores(path: Path, mode: str, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"mode": mode, "rows": rows}))

    def ens(miou: float, tta: float) -> list[dict]:
        return [{"name": "ensemble", "kind": "ensemble", "miou": miou, "iou": iou},
                {"name": "ensemble+tta", "kind": "ensemble", "miou": tta, "iou": iou}]

    folds = [{"name": f"{m}/fold_{f}", "kind": "fold", "miou": 0.6, "miou_tta": 0.61, "iou": iou}
             for m in ("a", "b") for f in (0, 1)]
    t = tmp_path / "teacher"
    scores(t / "scores-oof-f0.json", "oof", folds[::2] + ens(0.65, 0.66))
    scores(t / "scores.json", "test", folds + ens(0.76, 0.77))
    (t / "ensemble.json").write_text(json.dumps({"members": [{"name": "a", "oof_miou": 0.6},
                                                             {"name": "b", "oof_miou": 0.7}]}))
    scores(t / "scores-gold-f0.json", "test", folds[::2] + ens(0.72, 0.74))
    scores(tmp_path / "st" / "scores-oof.json", "oof", ens(0.64, 0.655))
    scores(tmp_path / "st" / "scores.json", "test", ens(0.75, 0.765))
    (tmp_path / "st" / "ensemble.json").write_text(json.dumps(
        {"members": [{"name": "s", "folds": [{"fold": 0}]}]}))
    out = table(tmp_path, "distill", "teacher", "st")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[2].startswith("| teacher (teacher ensemble) | 4 | 65.00 | **66.00** | 76.00 | **77.00** |")
    assert lines[3].startswith("| teacher, fold 0 models only | 2 | 65.00 | **66.00** | 72.00 | **74.00** |")
    assert lines[4] == "| b/fold_0 of teacher (hard labels only) | 1 | 60.00 | **61.00** | 60.00 | **61.00** | – |"
    assert lines[5] == "| st | 1 | 64.00 | **65.50** | 75.00 | **76.50** | 80.00 / 90.00 / 60.00 / 20.00 |"
    shutil.copytree(tmp_path / "st", tmp_path / "st-all")  # the same student, then --all
    (tmp_path / "st-all" / "scores-oof.json").unlink()
    (tmp_path / "st-all" / "ensemble.json").write_text(json.dumps(
        {"members": [{"name": "s", "folds": [{"fold": 5, "trained_on": "all"}]}]}))
    out = table(tmp_path, "distill", "teacher", "st", "st-all")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[6].startswith(
        "| st-all (`--all`: no held-out images) | 1 | – | **–** | 75.00 | **76.50** |")
    (tmp_path / "st" / "scores.json").unlink()
    out = table(tmp_path, "distill", "teacher", "st")
    assert out.returncode != 0 and "st/scores.json: missing" in out.stderr

TINY_LEVER = """folds = 3
seed = 0
[[members]]
name = "tiny-sample"
epochs = 1
batch_size = 16
[members.model]
name = "unet-attn"
args = { base_width = 4, depth = 2, aspp = true }
[members.loss]
terms = { focal = 1.0, lovasz = 1.0 }
class_weights = "inverse_sqrt"
class_scale = [1, 1, 1, 1, 2]
ignore_background = true
[members.sampling]
factor = 3.0
"""


@pytest.mark.slow
def test_run_real_mars_trains_and_scores_a_lever_on_some_folds(tmp_path):
    """prepare -> train (FOLDS=0,1, the recipe's own epochs) -> oof -> table round2."""
    write_synthetic(tmp_path / "d.npz", 120, 24, seed=1)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "lever-tiny.toml").write_text(TINY_LEVER)
    env = {**os.environ, "CLI": str(Path(sys.executable).parent / "marsseg-cli"),
           "NPZ": str(tmp_path / "d.npz"), "ROOT": str(tmp_path / "runs"),
           "RECIPES": str(tmp_path / "recipes"), "EPOCHS": "", "FOLDS": "0,1",
           "BACKEND": "eager", "RAY_AUTH_MODE": "disabled"}
    for cmd in (["prepare"], ["train", "lever-tiny"], ["oof", "lever-tiny"]):
        out = subprocess.run(["bash", str(SCRIPT), *cmd], env=env, capture_output=True, text=True,
                             cwd=ROOT, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "runs" / "lever-tiny"
    oof = json.loads((run / "scores-oof-f01.json").read_text())
    assert oof["mode"] == "oof" and sorted(oof["models"]) == ["tiny-sample/fold_0",
                                                             "tiny-sample/fold_1"]
    assert not (run / "scores.json").exists()  # no gold scores from a lever's OOF pass
    out = subprocess.run(["bash", str(SCRIPT), "oof", "lever-tiny"], cwd=ROOT, timeout=900,
                         env={**env, "MEMBERS": "tiny-sample"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    one = json.loads((run / "scores-oof-f01-tiny-sample.json").read_text())  # RUN/MEMBER rows
    assert one["members"] == ["tiny-sample"] and one["models"] == oof["models"]
    done = json.loads((run / "tiny-sample" / "fold_0" / "done.json").read_text())
    assert done["epochs"] == 1 and done["sampling"]["factor"] == 3.0
    # distill: a student of this (two-fold) teacher, scored on the slice and on gold; the
    # teacher's gold scores.json survives the slice's OOF pass (it was once overwritten)
    gold = run / "scores.json"
    gold.write_text('{"split": "test", "planted": true}')
    out = subprocess.run(["bash", str(SCRIPT), "distill", "none"], cwd=ROOT, timeout=900,
                         env={**env, "TEACHER": "lever-tiny", "EPOCHS": "1", "FOLDS": ""},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    teacher_slice = json.loads((run / "scores-oof-f0.json").read_text())
    assert sorted(teacher_slice["models"]) == ["tiny-sample/fold_0"]
    assert gold.read_text() == '{"split": "test", "planted": true}'
    pair = json.loads((run / "scores-gold-f0.json").read_text())
    assert pair["mode"] == "test" and sorted(pair["models"]) == ["tiny-sample/fold_0"]
    student = tmp_path / "runs" / "student-none"
    assert json.loads((student / "scores-oof.json").read_text())["mode"] == "oof"
    assert json.loads((student / "scores.json").read_text())["split"] == "test"
    shutil.copytree(run, tmp_path / "runs" / "lever-tiny2")
    out = table(tmp_path / "runs", "round2", "lever-tiny", "lever-tiny2", folds="0,1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[3].split(" | ")[7] == "+0.00"

    # lanes: single-fold jobs in two lanes; a finished run's folds are skipped, RECIPE:pseudo
    # trains RECIPE with --teacher $ROOT/$TEACHER into RECIPE-pseudo
    out = subprocess.run(["bash", str(SCRIPT), "lanes", "lever-tiny", "lever-tiny:pseudo"],
                         cwd=ROOT, timeout=900, capture_output=True, text=True,
                         env={**env, "TEACHER": "lever-tiny"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pseudo = tmp_path / "runs" / "lever-tiny-pseudo"
    assert json.loads((pseudo / "overrides.json").read_text())["teacher"] == str(run)
    spec = json.loads((pseudo / "ensemble.json").read_text())
    assert [f["fold"] for f in spec["members"][0]["folds"]] == [0, 1]
    # which lane pops which job is a race: both lanes ran, each pseudo fold was trained once
    assert "lane 1:" in out.stderr and "lane 2:" in out.stderr
    assert sorted(re.findall(r"^lane [12]: lever-tiny-pseudo fold (\d)$", out.stderr, re.M)) == ["0", "1"]
    assert json.loads((run / "tiny-sample" / "fold_0" / "done.json").read_text()) == done
    # REUSE: a recipe whose member is lever-tiny's adopts its finished folds, trains nothing
    shutil.copyfile(tmp_path / "recipes" / "lever-tiny.toml", tmp_path / "recipes" / "again.toml")
    out = subprocess.run(["bash", str(SCRIPT), "lanes", "again"], cwd=ROOT, timeout=900,
                         env={**env, "REUSE": "lever-tiny"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    again = json.loads((tmp_path / "runs" / "again" / "tiny-sample" / "fold_0" / "done.json")
                       .read_text())
    assert again["reused_from"]["run"] == str(run) and again["sha256"] == done["sha256"]
    # RECIPE@F: only that fold of RECIPE, whatever FOLDS says
    shutil.copyfile(tmp_path / "recipes" / "lever-tiny.toml", tmp_path / "recipes" / "one.toml")
    out = subprocess.run(["bash", str(SCRIPT), "lanes", "one@1"], cwd=ROOT, timeout=900,
                         env={**env, "REUSE": "lever-tiny"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # one job, two lanes: whichever lane pops it first trains it
    assert re.search(r"^lane [12]: one fold 1$", out.stderr, re.M) and "fold 0" not in out.stderr
    spec = json.loads((tmp_path / "runs" / "one" / "ensemble.json").read_text())
    assert [f["fold"] for f in spec["members"][0]["folds"]] == [1]
    out = subprocess.run(["bash", str(SCRIPT), "lanes", "lever-tiny:nope"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown variant in lever-tiny:nope" in out.stderr


def test_round2_table_takes_one_member_of_a_run_as_a_row(tmp_path):
    """RUN/MEMBER reads scores-oof-f012-MEMBER.json (MEMBERS=MEMBER run-real-mars.sh oof RUN)."""
    fake_lever(tmp_path, "best", "res-ds-dice", [0, 1, 2], 0.68, 0.22, "-f012-res-ds-dice",
               left_scores=False)
    fake_lever(tmp_path, "lever-e40", "res-ds-dice", [0, 1, 2], 0.70, 0.25, "-f012")
    out = table(tmp_path, "round2", "best/res-ds-dice", "lever-e40", folds="0,1,2")
    assert out.returncode == 0, out.stderr
    base, lever = (line.split(" | ") for line in out.stdout.splitlines()[2:])
    assert base[0] == "| best/res-ds-dice" and base[6] == "**68.00**"
    assert lever[7] == "+2.00" and lever[10] == "+3.00"
    out = table(tmp_path, "round2", "best/other", "lever-e40", folds="0,1,2")
    assert out.returncode != 0
    assert ("scores-oof-f012-other.json: missing; run `MEMBERS=other FOLDS=0,1,2 "
            "results/run-real-mars.sh oof best` first") in out.stderr


def test_round2_table_counts_a_two_member_runs_folds_once(tmp_path):
    fake_lever(tmp_path, "lever-e40", "res-ds-dice", [0, 1, 2], 0.70, 0.25, "-f012")
    fake_lever(tmp_path, "pair", "a", [0, 1, 2], 0.72, 0.26, "-f012", left_scores=False)
    path = tmp_path / "pair" / "scores-oof-f012.json"
    scores = json.loads(path.read_text())
    scores["models"] += [f"b/fold_{f}" for f in (0, 1, 2)]
    path.write_text(json.dumps(scores))
    out = table(tmp_path, "round2", "lever-e40", "pair", folds="0,1,2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[3].split(" | ")[2] == "0,1,2"
