"""Print the markdown tables of results/real-mars.md from the run folders.

Reads only what marsseg-cli wrote: ensemble.json (train-folds / select), done.json
per fold, scores.json (evaluate --tta on the gold test crops), scores-oof*.json
(evaluate --split train --tta, copied aside by run-real-mars.sh). Usage:
    .venv/bin/python results/table.py ladder RECIPE...    # fold 0 of each member
    .venv/bin/python results/table.py folds RECIPE...     # all folds, OOF and ensembles
    .venv/bin/python results/table.py round2 BASE LEVER...  # issue 18: OOF of each lever vs BASE
        (RUN/MEMBER: one member of a run, as `MEMBERS=MEMBER run-real-mars.sh oof RUN` scored it)
    .venv/bin/python results/table.py distill TEACHER STUDENT...  # issue 17: slice and gold
ROOT (default runs/real-mars) and FOLDS (e.g. 0,1,2: the OOF scores of those folds,
as `FOLDS=0,1,2 run-real-mars.sh oof` wrote them) are read from the environment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("ROOT", "runs/real-mars"))


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def delta(v, ref) -> str:
    return "–" if v is None or ref is None else f"{100 * (v - ref):+.2f}"


def classes(iou) -> str:
    return " / ".join(pct(v) for v in (iou or [None] * 5)[1:])


def load(recipe: str):
    run = ROOT / recipe
    ens = json.loads((run / "ensemble.json").read_text())
    path = run / "scores.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    # an out-of-fold scores.json (evaluate --split train left in place) is not gold
    gold = {r["name"]: r for r in scores.get("rows", []) if scores.get("mode", "test") == "test"}
    return run, ens, gold


def oof_file(recipe: str, folds: str | None = None) -> Path:
    """The OOF scores run-real-mars.sh keeps aside: scores-oof.json, -f012 for FOLDS=0,1,2,
    then -MEMBER for RUN/MEMBER (MEMBERS=MEMBER)."""
    folds = os.environ.get("FOLDS", "") if folds is None else folds
    tag = "-f" + "".join(f.strip() for f in folds.split(",")) if folds else ""
    run, _, member = recipe.partition("/")
    return ROOT / run / f"scores-oof{tag}{'-' + member if member else ''}.json"


def done(run: Path, fold: dict) -> dict:
    p = run / fold["path"] / "done.json"
    return json.loads(p.read_text()) if p.exists() else {}


def ladder(recipes: list[str]) -> None:
    print("| recipe | member | fold 0 val mIoU | fold 0 val IoU soil / bedrock / sand / big rock "
          "| gold mIoU | gold +TTA | gold IoU soil / bedrock / sand / big rock | train min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in recipes:
        run, ens, gold = load(r)
        for m in ens["members"]:
            f0 = next(f for f in m["folds"] if f["fold"] == 0)
            d = done(run, f0)
            g = gold.get(f"{m['name']}/fold_0", {})
            print(f"| {r} | {m['name']} | {pct(d.get('val_miou'))} | {classes(d.get('val_iou'))} | "
                  f"{pct(g.get('miou'))} | {pct(g.get('miou_tta'))} | {classes(g.get('iou'))} | "
                  f"{d.get('train_seconds', 0) / 60:.1f} |")


def folds(recipes: list[str]) -> None:
    print("| recipe | member | weight | fold val mIoU (mean ± std) | OOF mIoU | OOF IoU soil / bedrock / sand / big rock "
          "| gold fold 0 | gold fold 0 +TTA | train min (5 folds) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in recipes:
        run, ens, gold = load(r)
        for m in ens["members"]:
            vals = [f["val_miou"] for f in m["folds"] if f.get("val_miou") is not None]
            secs = sum(done(run, f).get("train_seconds", 0) for f in m["folds"])
            g = gold.get(f"{m['name']}/fold_0", {})
            print(f"| {r} | {m['name']} | {m.get('weight', 1.0):.2f} | {pct(np.mean(vals))} ± "
                  f"{pct(np.std(vals))} | {pct(m.get('oof_miou'))} | {classes(m.get('oof_iou'))} | "
                  f"{pct(g.get('miou'))} | {pct(g.get('miou_tta'))} | {secs / 60:.0f} |")
    print()
    print("| recipe | OOF mIoU, ensemble | gold mIoU, ensemble | gold mIoU, ensemble + TTA "
          "| gold IoU soil / bedrock / sand / big rock (ensemble + TTA) | gold pixel accuracy |")
    print("|---|---|---|---|---|---|")
    for r in recipes:
        run, ens, gold = load(r)
        oof = ens.get("selection", {}).get("oof_miou", ens.get("oof_miou_ensemble"))
        e, t = gold.get("ensemble", {}), gold.get("ensemble+tta", {})
        print(f"| {r} | {pct(oof)} | {pct(e.get('miou'))} | **{pct(t.get('miou'))}** | "
              f"{classes(t.get('iou'))} | {pct(t.get('pixel_accuracy'))} |")


def _oof(recipe: str) -> dict:
    path = oof_file(recipe)
    if not path.exists():
        run, _, member = recipe.partition("/")
        env = "".join(f"{k}={v} " for k, v in (("MEMBERS", member),
                                                ("FOLDS", os.environ.get("FOLDS", ""))) if v)
        sys.exit(f"{path}: missing; run `{env}results/run-real-mars.sh oof {run}` first")
    scores = json.loads(path.read_text())
    if scores.get("mode") != "oof":
        sys.exit(f"{path}: not out-of-fold scores (mode {scores.get('mode')!r})")
    rows = {r["name"]: r for r in scores["rows"]}
    return {"plain": rows["ensemble"], "tta": rows.get("ensemble+tta", {}),
            "folds": sorted({int(m.rsplit("_", 1)[1]) for m in scores["models"]}),
            "members": scores["members"]}


def round2(recipes: list[str]) -> None:
    """One row per lever: OOF mIoU and big-rock IoU (plain and +TTA), deltas to the first."""
    print("| recipe | member | folds | epochs | best epochs | OOF mIoU | OOF +TTA | Δ +TTA "
          "| big rock OOF | big rock +TTA | Δ big rock +TTA | OOF +TTA soil / bedrock / sand "
          "| train min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for r in recipes:
        run, ens, _ = load(r.partition("/")[0])
        o = _oof(r)
        fold_entries = [f for m in ens["members"] if m["name"] in o["members"]
                        for f in m["folds"] if f["fold"] in o["folds"]]
        dones = [done(run, f) for f in fold_entries]
        t, p = o["tta"] or o["plain"], o["plain"]
        if base is None:
            base = t, o["folds"]
        elif o["folds"] != base[1]:
            sys.exit(f"{r}: OOF over folds {o['folds']} but {recipes[0]} over {base[1]}; "
                     "compare on the same folds (FOLDS=...)")
        d_miou = "" if t is base[0] else delta(t["miou"], base[0]["miou"])
        d_rock = "" if t is base[0] else delta(t["iou"][4], base[0]["iou"][4])
        epochs = sorted({d.get("epochs") for d in dones if d})
        best = ", ".join(str(d.get("best_epoch")) for d in dones if d)
        secs = sum(d.get("train_seconds", 0) for d in dones)
        print(f"| {r} | {', '.join(o['members'])} | {','.join(map(str, o['folds']))} | "
              f"{'/'.join(map(str, epochs))} | {best} | {pct(p['miou'])} | **{pct(t['miou'])}** | "
              f"{d_miou} | {pct(p['iou'][4])} | **{pct(t['iou'][4])}** | {d_rock} | "
              f"{' / '.join(pct(v) for v in t['iou'][1:4])} | {secs / 60:.0f} |")


def _rows(path: Path, mode: str) -> dict:
    if not path.exists():
        sys.exit(f"{path}: missing; run `results/run-real-mars.sh distill ...` first")
    scores = json.loads(path.read_text())
    if scores.get("mode", "test") != mode:
        sys.exit(f"{path}: mode {scores.get('mode')!r}, expected {mode!r}")
    return {r["name"]: r for r in scores["rows"]}


def _distill_row(label: str, nets: int, sl: dict, sl_tta: dict | None, gold: dict,
                 gold_tta: dict | None) -> None:
    def tta(row: dict, row_tta: dict | None) -> str:  # a fold row carries only miou_tta
        return pct(row_tta["miou"]) if row_tta else pct(row.get("miou_tta"))

    per_class = classes(gold_tta["iou"]) if gold_tta else "–"
    print(f"| {label} | {nets} | {pct(sl['miou'])} | **{tta(sl, sl_tta)}** | {pct(gold['miou'])} "
          f"| **{tta(gold, gold_tta)}** | {per_class} |")


def distill(runs: list[str]) -> None:
    """Teacher (OOF on the held-out slice = its fold 0 validation part; gold), its strongest
    member's fold 0 model (the same data and recipe, hard labels only), then each student."""
    teacher, students = runs[0], runs[1:]
    print("| model | networks | slice mIoU | slice +TTA | gold mIoU | gold +TTA "
          "| gold per class soil / bedrock / sand / big rock |")
    print("|---|---|---|---|---|---|---|")
    sl, gold = _rows(ROOT / teacher / "scores-oof-f0.json", "oof"), _rows(ROOT / teacher / "scores.json", "test")
    nets = sum(1 for r in gold.values() if r.get("kind") == "fold")
    _distill_row(f"{teacher} (teacher ensemble)", nets, sl["ensemble"], sl.get("ensemble+tta"),
                 gold["ensemble"], gold.get("ensemble+tta"))
    pair = ROOT / teacher / "scores-gold-f0.json"  # its fold 0 models alone (run-real-mars.sh)
    if pair.exists():
        g0 = _rows(pair, "test")
        _distill_row(f"{teacher}, fold 0 models only", sum(1 for r in g0.values() if r.get("kind") == "fold"),
                     sl["ensemble"], sl.get("ensemble+tta"), g0["ensemble"], g0.get("ensemble+tta"))
    # the default student's architecture: the teacher's member with the best OOF mIoU
    members = json.loads((ROOT / teacher / "ensemble.json").read_text())["members"]
    twin = max(members, key=lambda m: m.get("oof_miou") or 0)["name"] + "/fold_0"
    if twin in sl and twin in gold:
        _distill_row(f"{twin} of {teacher} (hard labels only)", 1, sl[twin], None, gold[twin], None)
    for st in students:
        s_gold = _rows(ROOT / st / "scores.json", "test")
        spec = json.loads((ROOT / st / "ensemble.json").read_text())
        if spec["members"][0]["folds"][0].get("trained_on") == "all":  # --all: nothing held out
            s_sl = {"ensemble": {"miou": None}, "ensemble+tta": {"miou": None}}
            st += " (`--all`: no held-out images)"
        else:
            s_sl = _rows(ROOT / st / "scores-oof.json", "oof")
        _distill_row(st, 1, s_sl["ensemble"], s_sl.get("ensemble+tta"), s_gold["ensemble"],
                     s_gold.get("ensemble+tta"))


if __name__ == "__main__":
    {"ladder": ladder, "folds": folds, "round2": round2, "distill": distill}[sys.argv[1]](sys.argv[2:])
