"""Student vs teacher ensemble: prediction images/s under the default backend, side by side.

Both go through `marsseg.predict.predict` exactly as `marsseg-cli predict --tta` runs them
(backend auto, precision auto, flip TTA), on the same test images, alternating teacher and
student for `ROUNDS` rounds (the best round of each counts; backend conversions happen in
the first call and are cached, so they are outside the timed rate: the summary's
``images_per_s`` counts prediction only).

By default the two are built with random weights in the shape that issue 17 compares:
the teacher is ``ensembles/marsseg-best.toml`` (2 members x 5 folds, half width), the
student one network of its residual + deep-supervision member. With ``BENCH_TEACHER_RUN``,
``BENCH_STUDENT_RUN`` (trained run folders, e.g. from ``marsseg-cli distill``) and
``BENCH_DISTILL_DATA`` (their shard folder) it measures those on that data's test split.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2


def _run_folder(run: Path, members: list[tuple[str, str, dict]], k: int, seed: int = 0) -> Path:
    """A run folder of random-weight fold models: members = (name, model, args)."""
    from marsseg._io import sha256_file
    from marsseg.models.registry import build_model, save_pretrained

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for name, model, args in members:
        folds = []
        for f in range(k):
            m = build_model(model, **args)
            for mod in m.modules():  # untrained BN stats make nets near-constant; spread them
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.2, generator=g)
                    mod.running_var.uniform_(0.5, 1.5, generator=g)
            folder = save_pretrained(m, run / name / f"fold_{f}", {"member": name, "fold": f})
            folds.append({"fold": f, "path": f"{name}/fold_{f}",
                          "sha256": sha256_file(folder / "model.safetensors")})
        entries.append({"name": name, "weight": 1.0, "folds": folds})
    spec = {"format_version": 1, "name": run.name, "k": k, "members": entries,
            "selected": [e[0] for e in members]}
    (run / "ensemble.json").write_text(json.dumps(spec))
    return run


def _synthetic(d: Path, n_test: int) -> tuple[Path, Path, Path]:
    from bench.bench_predict import _make_shards
    from marsseg.config import load_recipe

    recipe = load_recipe(ROOT / "ensembles" / "marsseg-best.toml")
    members = [(m.name, m.model.name, dict(m.model.args)) for m in recipe.members]
    teacher = _run_folder(d / "teacher", members, recipe.folds)
    student = _run_folder(d / "student", [("student", *members[-1][1:])], 1, seed=1)
    return teacher, student, _make_shards(d, n_test)


def run(quick: bool = False) -> dict:
    from marsseg.predict import predict

    n_test = 64 if quick else 515  # real-mars' test split
    given = [os.environ.get(k) for k in ("BENCH_TEACHER_RUN", "BENCH_STUDENT_RUN",
                                         "BENCH_DISTILL_DATA")]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if all(given):
            teacher, student, data = (Path(p) for p in given)
        else:
            teacher, student, data = _synthetic(d, n_test)
        rows = {"teacher": [], "student": []}
        summaries = {}
        for _ in range(ROUNDS):
            for name, run_dir in (("teacher", teacher), ("student", student)):
                s = predict(run_dir, data, d / f"{name}.csv", tta=True, backend="auto")
                rows[name].append(s.images_per_s)
                summaries[name] = s
    best = {k: max(v) for k, v in rows.items()}
    return {
        "what": "predict --tta images/s, default backend (auto), teacher ensemble vs student",
        "trained_runs": all(given),
        "teacher": {"run": str(given[0] or "synthetic marsseg-best 2x5"),
                    "models": len(summaries["teacher"].models),
                    "images_per_s": best["teacher"], "rounds": rows["teacher"],
                    "backend": summaries["teacher"].backend,
                    "precision": summaries["teacher"].precision},
        "student": {"run": str(given[1] or "synthetic one res-ds network"),
                    "models": len(summaries["student"].models),
                    "images_per_s": best["student"], "rounds": rows["student"],
                    "backend": summaries["student"].backend,
                    "precision": summaries["student"].precision},
        "student_speedup": round(best["student"] / max(best["teacher"], 1e-9), 2),
        "images": summaries["student"].rows,
        "threads": torch.get_num_threads(),
    }
