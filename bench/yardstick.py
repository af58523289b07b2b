"""The yardstick: a recipe's fold in marsseg against the plain reference loop, same fold, same epochs.

For each seed: `marsseg-cli train-folds --sequential` trains the recipe's member on one
fold (recipe seed = the seed, split seed fixed, so every seed validates on the same
fold), `marsseg-cli evaluate` scores it on the labeled test split (gold) with and
without flip TTA, and `bench.plain_loop` trains the plain PyTorch loop on the
same fold (read from the run's splits.json) for the same epochs. Prints one
markdown row per run and their means, and writes `<root>/<name>.json`.

    python -m bench.yardstick --data SHARDS --recipe ensembles/seed-final.toml \
        --fold 0 --epochs 30 --seeds 0,1 --root ~/marsseg-runs/yard
    # an ablation: the same recipe with one key changed (applies to every member)
    python -m bench.yardstick ... --set members.augment.cutmix_mode='"sample"' --name abl-cutmix-sample

Runs are resumable: a finished marsseg fold or plain.json is reused, so a rerun
only prints. Run it alone on the machine (wall times are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).with_name("marsseg-cli")
CLASSES = ("soil", "bedrock", "sand", "big rock")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_recipe(doc: dict) -> str:
    """A recipe dict as TOML: top-level keys, then one [[members]] table each (inline sub-tables)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if k != "members"]
    for m in doc.get("members", []):
        lines += ["", "[[members]]"] + [f"{k} = {toml_value(v)}" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def apply_set(doc: dict, assignment: str) -> None:
    """`a.b.c=VALUE` (VALUE in TOML syntax); a leading `members.` applies to every member."""
    key, _, raw = assignment.partition("=")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.strip().split(".")
    targets = doc["members"] if parts[0] == "members" else [doc]
    parts = parts[1:] if parts[0] == "members" else parts
    for t in targets:
        for p in parts[:-1]:
            if p == "args" and "args" not in t:
                t["args"] = {}
            t = t.setdefault(p, {})
        t[parts[-1]] = value


def make_recipe(recipe: Path, seed: int, sets: list[str], dest: Path) -> Path:
    doc = tomllib.loads(recipe.read_text())
    if "defaults" in doc:
        raise SystemExit(f"{recipe}: [defaults] recipes are not supported here; use a one-member recipe")
    doc["split_seed"] = doc.get("split_seed", doc.get("seed", 0))
    doc["seed"] = seed
    for s in sets:
        apply_set(doc, s)
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = dump_recipe(doc)
    if not dest.exists() or dest.read_text() != text:
        dest.write_text(text)
    return dest


def run(cmd: list, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"}).returncode
    if rc:
        sys.exit(f"yardstick: {Path(cmd[0]).name} {cmd[1]} exited with {rc}; see {log}")
    return time.perf_counter() - t0


def marsseg_row(args, name: str, seed: int) -> dict:
    base = args.root / f"{name}-s{seed}"
    out = base / "run"
    recipe = make_recipe(args.recipe, seed, args.set, base / f"{name}-s{seed}.toml")
    log = base / "log.txt"
    run([CLI, "train-folds", "--data", args.data, "--recipe", recipe, "--out", out,
         "--epochs", args.epochs, "--folds", args.fold, "--sequential", "--threads", args.threads,
         "--progress", "plain"], log)
    scores = out / "scores.json"
    if not scores.exists():
        run([CLI, "evaluate", "--ensemble", out, "--data", args.data, "--folds", args.fold, "--tta",
             "-q"], log)
    s = json.loads(scores.read_text())
    done = [json.loads(p.read_text()) for p in out.glob(f"*/fold_{args.fold}/done.json")]
    metrics = [json.loads(x) for p in out.glob(f"*/fold_{args.fold}/metrics.jsonl")
               for x in p.read_text().splitlines()]
    rows = {(r.get("kind"), r.get("tta")): r for r in s["rows"]}
    ens, ens_tta = rows[("ensemble", False)], rows[("ensemble", True)]
    return {"name": f"marsseg {name}", "seed": seed, "val": done[0]["val_miou"],
            "best_epoch": done[0]["best_epoch"], "gold": ens["miou"], "gold_tta": ens_tta["miou"],
            "gold_tta_iou": ens_tta["iou"][1:],
            "img_s": sorted(m["img_s"] for m in metrics)[len(metrics) // 2],
            "wall_min": sum(m["seconds"] for m in metrics) / 60, "splits": str(out / "splits.json"),
            "recipe": str(recipe)}


def plain_row(args, seed: int, splits: str) -> dict:
    out = args.root / f"plain-split{args.split_seed}-f{args.fold}-e{args.epochs}-s{seed}"
    if not (out / "plain.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "bench.plain_loop", "--data", args.data, "--splits", splits,
             "--fold", args.fold, "--epochs", args.epochs, "--seed", seed, "--threads", args.threads,
             "--out", out], out / "log.txt")
    r = json.loads((out / "plain.json").read_text())
    return {"name": "plain loop", "seed": seed, "val": r["val_miou"], "best_epoch": r["best_epoch"],
            "gold": r["gold"], "gold_tta": r["gold_tta"], "gold_tta_iou": r["gold_tta_iou"][1:],
            "img_s": r["train_img_s"], "wall_min": r["wall_s"] / 60}


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| run | seed | val mIoU | gold mIoU | gold +TTA | gold +TTA IoU "
            + " / ".join(CLASSES) + " | best epoch | train img/s | wall min |")
    out = [head, "|" + "---|" * 9]
    for r in rows:
        iou = " / ".join(f"{100 * v:.1f}" if v is not None else "-" for v in r["gold_tta_iou"])
        out.append(f"| {r['name']} | {r['seed']} | {pct(r['val'])} | {pct(r['gold'])} | "
                   f"**{pct(r['gold_tta'])}** | {iou} | {r['best_epoch']} | {r['img_s']:.1f} | "
                   f"{r['wall_min']:.1f} |")
    return "\n".join(out)


def mean_rows(rows: list[dict]) -> list[dict]:
    means = []
    for name in dict.fromkeys(r["name"] for r in rows):
        rs = [r for r in rows if r["name"] == name]
        if len(rs) < 2:
            continue
        avg = {k: sum(r[k] for r in rs) / len(rs) for k in ("val", "gold", "gold_tta", "img_s", "wall_min")}
        iou = [None if any(r["gold_tta_iou"][i] is None for r in rs)
               else sum(r["gold_tta_iou"][i] for r in rs) / len(rs) for i in range(4)]
        means.append({"name": f"{name} (mean)", "seed": ",".join(str(r["seed"]) for r in rs),
                      "best_epoch": "-", "gold_tta_iou": iou, **avg})
    return means


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.yardstick", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared shard folder with a labeled test split")
    ap.add_argument("--recipe", type=Path, default=ROOT / "ensembles" / "seed-final.toml")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path.home() / "marsseg-runs" / "yard")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key (TOML value); 'members.' applies to every member")
    ap.add_argument("--name", help="name of this variant (default: the recipe's file stem)")
    ap.add_argument("--no-plain", action="store_true", help="marsseg rows only")
    args = ap.parse_args()
    if args.set and not args.name:
        ap.error("--set needs --name (the variant's run folders are named after it)")
    for what, path in (("--data", args.data / "dataset.json"), ("--recipe", args.recipe)):
        if not path.is_file():
            ap.error(f"{what}: {path} does not exist (--data is a shard folder from marsseg-cli prepare)")
    name = args.name or args.recipe.stem
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        ap.error(f"--name {name!r}: letters, digits, '_', '-', '.' only")
    doc = tomllib.loads(args.recipe.read_text())
    args.split_seed = doc.get("split_seed", doc.get("seed", 0))
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        m = marsseg_row(args, name, seed)
        rows.append(m)
        if not args.no_plain:
            rows.append(plain_row(args, seed, m["splits"]))
        print(table(rows[-2:] if not args.no_plain else rows[-1:]), flush=True)
    rows.sort(key=lambda r: r["name"] != "plain loop")
    text = table(rows + mean_rows(rows))
    print(f"\nfold {args.fold}, {args.epochs} epochs, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}\n{text}")
    (args.root / f"{name}.json").write_text(json.dumps({"rows": rows, "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
