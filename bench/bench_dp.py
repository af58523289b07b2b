"""What a data-parallel fold costs on a CPU: 1 fold x 2 threads vs 2 workers x 1 thread.

The same fold of the real recipe (`ensembles/seed-final.toml`, batch 32, bf16) on
synthetic 64x128 images, trained through `train-folds` on the embedded Ray twice:
- `--cpus-per-task 2 --threads 2`: one plain Ray task, torch with 2 threads;
- `--workers-per-fold 2 --cpus-per-task 1 --threads 1`: a Ray Train TorchTrainer with
  2 gloo workers of 1 thread, each taking 16 images of every global batch of 32.
Training-phase img/s comes from each run's metrics.jsonl (epochs after the first, best
of them, so a load spike does not decide); wall seconds include Ray Train's start-up.
The two runs alternate (single, workers, single, ...) `repeats` times and the best of
each is kept. `python -m bench dp` runs this alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "ensembles" / "seed-final.toml"
PRECISION = "bf16"


def _train(recipe: Path, shards: Path, out: Path, epochs: int, workers: int) -> dict:
    from marsseg.orchestrate import RunOptions, train_folds

    opts = (RunOptions(cpus_per_task=2, threads=2, folds=(0,), precision=PRECISION,
                       progress="none") if workers == 1 else
            RunOptions(cpus_per_task=1, threads=1, folds=(0,), precision=PRECISION,
                       progress="none", workers_per_fold=workers))
    t0 = time.perf_counter()
    train_folds(recipe, shards, out, opts, epochs=epochs)
    wall = time.perf_counter() - t0
    member = next(p.name for p in out.iterdir() if (p / "fold_0").is_dir())
    fold = out / member / "fold_0"
    rows = [json.loads(x) for x in (fold / "metrics.jsonl").read_text().splitlines()]
    steady = [r["img_s"] for r in rows[1:]] or [rows[0]["img_s"]]
    return {"wall_s": round(wall, 2), "train_img_s": max(steady),
            "val_miou": rows[-1]["val_miou"]}


def run(quick: bool = False) -> dict:
    import ray

    from marsseg.cluster import start_ray
    from marsseg.data import prepare
    from marsseg.synth import write_synthetic

    n_train = 256 if quick else 1280
    epochs = 2 if quick else 3
    repeats = 1 if quick else 2
    tmp = Path(tempfile.mkdtemp(prefix="bench_dp-"))
    load_before = os.getloadavg()[0]
    try:
        write_synthetic(tmp / "s.npz", n_train, 8, seed=0)
        prepare(tmp / "s.npz", tmp / "shards")
        start_ray()
        try:
            runs = {"1x2threads": [], "2workers_x1thread": []}
            for i in range(repeats):
                runs["1x2threads"].append(_train(RECIPE, tmp / "shards", tmp / f"one{i}",
                                                 epochs, 1))
                runs["2workers_x1thread"].append(_train(RECIPE, tmp / "shards", tmp / f"two{i}",
                                                        epochs, 2))
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: max(v, key=lambda r: r["train_img_s"]) for k, v in runs.items()}
    return {
        "setup": {"recipe": RECIPE.name, "precision": PRECISION, "epochs": epochs,
                  "n_train_synthetic": n_train, "fold": 0, "repeats": repeats,
                  "loadavg_1min_before_after": [round(load_before, 2),
                                                round(os.getloadavg()[0], 2)]},
        "runs": runs,
        "workers_vs_threads_train_img_s": round(best["2workers_x1thread"]["train_img_s"]
                                                / best["1x2threads"]["train_img_s"], 3),
        "workers_vs_threads_wall": round(best["1x2threads"]["wall_s"]
                                         / best["2workers_x1thread"]["wall_s"], 3),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
