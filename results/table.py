"""Print the markdown tables of results/real-mars.md from the run folders.

Reads only what marsseg-cli wrote: ensemble.json (train-folds / select), done.json
per fold, scores.json (evaluate --tta on the gold test crops). Usage:
    .venv/bin/python results/table.py ladder RECIPE...    # fold 0 of each member
    .venv/bin/python results/table.py folds RECIPE...     # all folds, OOF and ensembles
ROOT (default runs/real-mars) is read from the environment.
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


def classes(iou) -> str:
    return " / ".join(pct(v) for v in (iou or [None] * 5)[1:])


def load(recipe: str):
    run = ROOT / recipe
    ens = json.loads((run / "ensemble.json").read_text())
    path = run / "scores.json"
    gold = {r["name"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    return run, ens, gold


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


if __name__ == "__main__":
    {"ladder": ladder, "folds": folds}[sys.argv[1]](sys.argv[2:])
