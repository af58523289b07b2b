"""make gpu-check: the GPU path end to end, one command, a few minutes on one GPU.

synth -> prepare -> train-folds (folds 0 and 1 of `seed-final`, 2 epochs, two folds
sharing the GPU with --gpus-per-task 0.5) in bf16 and in fp16; with 2 or more GPUs one
more fold with --workers-per-fold 2 (a GPU per worker) -> predict --tta (eager, on CUDA)
and evaluate. The labels predicted on the GPU are compared with the labels the same
weights give on the CPU in fp32 (at most --max-diff of the pixels may differ). Prints
one JSON object: train and predict img/s, label drift, scores; exit 0 when every check
passes, 1 when one fails, 2 when it cannot run (no CUDA device, bad arguments).

Every step runs the real command line (`python -m marsseg.cli`, or the checkout's `cli`
package when marsseg is not installed), so it checks what users run. `.ci/gpu-check`
(what `make gpu-check` calls) finds or makes the Python environment; this file installs
nothing.
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

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "ensembles" / "seed-final.toml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])

    def error(message: str):  # one line and exit 2, like marsseg-cli
        print(f"gpu-check: {message}", file=sys.stderr)
        sys.exit(2)

    ap.error = error
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-check",
                    help="work folder (data, runs, CSVs, result.json); must be new or empty")
    ap.add_argument("--n-train", type=int, default=1200, help="synthetic training images")
    ap.add_argument("--n-test", type=int, default=300, help="synthetic test images (with masks)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per fold")
    ap.add_argument("--precisions", default="bf16,fp16", help="training precisions to check")
    ap.add_argument("--max-diff", type=float, default=0.005,
                    help="largest share of pixels whose GPU label may differ from the CPU's")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="recipe to train")
    args = ap.parse_args(argv)
    for name in ("n_train", "n_test", "epochs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_train < 40:
        ap.error(f"--n-train {args.n_train}: 2 folds need at least 40 training images")
    if not 0 <= args.max_diff < 1:
        ap.error(f"--max-diff must be in [0, 1), got {args.max_diff}")
    args.precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in args.precisions if p not in ("bf16", "fp16", "no")]
    if bad or not args.precisions:
        ap.error(f"--precisions: {','.join(bad) or 'empty'} (choose from bf16, fp16, no)")
    if not args.recipe.is_file():
        ap.error(f"--recipe {args.recipe}: no such file")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        ap.error(f"--out {args.out}: exists and is not an empty folder")
    return args


def cli_command() -> list[str]:
    """How to start marsseg-cli with this Python: installed, or from the checkout."""
    try:
        import marsseg.cli  # noqa: F401

        return [sys.executable, "-m", "marsseg.cli"]
    except ImportError:
        return [sys.executable, "-m", "cli"]


def run_cli(*args: str) -> str:
    """Run one marsseg-cli command (from the checkout, which Ray workers import too)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    r = subprocess.run(cli_command() + list(args), capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"marsseg-cli {args[0]} failed (exit {r.returncode}):\n{tail}")
    return r.stdout


def fold_train_img_s(run: Path) -> dict:
    """Training-phase img/s of every trained fold's last epoch (metrics.jsonl)."""
    out = {}
    for metrics in sorted(run.glob("*/fold_*/metrics.jsonl")):
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        out[f"{metrics.parent.parent.name}/{metrics.parent.name}"] = rows[-1]["img_s"]
    return out


def predict_labels(run: Path, shards: Path, csv: Path, *, device: str, precision: str) -> float:
    """predict --tta (eager) on `device` into `csv`; returns the img/s predict reports."""
    text = run_cli("predict", "--ensemble", str(run), "--data", str(shards), "--out", str(csv),
                   "--tta", "--backend", "eager", "--device", device, "--precision", precision,
                   "--quiet")
    m = re.search(r"([\d.]+) img/s", text)
    return float(m.group(1)) if m else float("nan")


def label_diff(a_csv: Path, b_csv: Path) -> float:
    """Share of pixels whose labels differ between two submission CSVs of the same images."""
    import numpy as np

    from marsseg.submission import read_submission

    ids_a, a = read_submission(a_csv)
    ids_b, b = read_submission(b_csv)
    if not np.array_equal(ids_a, ids_b):
        raise RuntimeError(f"{a_csv} and {b_csv} hold different image ids")
    return float((a != b).mean())


def cpu_reference(run: Path, shards: Path, work: Path) -> tuple[Path, float]:
    """The CPU half of the comparison: the run's labels on the CPU in fp32 (eager)."""
    csv = work / f"{run.name}-cpu-fp32.csv"
    return csv, predict_labels(run, shards, csv, device="cpu", precision="no")


def _train(args, shards: Path, run: Path, precision: str, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    run_cli("train-folds", "--data", str(shards), "--recipe", str(args.recipe), "--out", str(run),
            "--epochs", str(args.epochs), "--precision", precision, "--progress", "none", *extra)
    img_s = fold_train_img_s(run)
    return {"wall_s": round(time.perf_counter() - t0, 1), "img_s_per_fold": img_s,
            "img_s_sum": round(sum(img_s.values()), 1)}


def _check_run(args, run: Path, shards: Path, precision: str) -> dict:
    gpu_csv = args.out / f"{run.name}-cuda.csv"
    gpu_img_s = predict_labels(run, shards, gpu_csv, device="cuda", precision=precision)
    cpu_csv, cpu_img_s = cpu_reference(run, shards, args.out)
    diff = label_diff(gpu_csv, cpu_csv)
    return {"predict_cuda_img_s": gpu_img_s, "predict_cpu_fp32_img_s": cpu_img_s,
            "labels_differ_from_cpu": round(diff, 6), "ok": diff <= args.max_diff}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: torch {torch.__version__} sees no CUDA device; run it where one "
              f"is (with a CUDA build of torch)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    result = {"device": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
              "cuda": torch.version.cuda, "recipe": args.recipe.name, "epochs": args.epochs,
              "n_train": args.n_train, "n_test": args.n_test, "train": {}, "predict": {}}
    npz, shards = args.out / "synth.npz", args.out / "shards"
    run_cli("synth", "--out", str(npz), "--n-train", str(args.n_train),
            "--n-test", str(args.n_test), "--seed", "0")
    run_cli("prepare", "--data", str(npz), "--out", str(shards))
    for prec in args.precisions:
        run = args.out / "runs" / prec
        result["train"][prec] = _train(args, shards, run, prec,
                                       ["--folds", "0,1", "--gpus-per-task", "0.5"])
        result["predict"][prec] = _check_run(args, run, shards, prec)
    if gpus >= 2:
        run = args.out / "runs" / "workers2"
        result["train"]["workers2"] = _train(
            args, shards, run, args.precisions[0],
            ["--folds", "0", "--gpus-per-task", "1", "--workers-per-fold", "2"])
        result["predict"]["workers2"] = _check_run(args, run, shards, args.precisions[0])
    else:
        result["train"]["workers2"] = f"skipped: {gpus} GPU (needs 2)"
    first = args.out / "runs" / args.precisions[0]
    run_cli("evaluate", "--ensemble", str(first), "--data", str(shards), "--tta",
            "--backend", "eager", "--device", "cuda")
    scores = json.loads((first / "scores.json").read_text())
    result["evaluate"] = {r["name"]: {k: v for k, v in r.items() if k.startswith("miou")}
                          for r in scores.get("rows", [])}
    result["ok"] = all(p["ok"] for p in result["predict"].values())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        sys.exit(1)
