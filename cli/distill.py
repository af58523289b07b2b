"""marsseg-cli distill: one fast student network taught by a k-fold teacher ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.runfolder import ENSEMBLE

from ._app import app, user_errors


@app.command("distill", help=f"Teach one student network from the teacher run folder ENSEMBLE on DATA; OUT is an ordinary run folder ({ENSEMBLE} with one model).")
def distill(
    ensemble: Annotated[Path, typer.Option(help="the teacher: a finished train-folds run folder (with its out-of-fold predictions)")],
    data: Annotated[Path, typer.Option(help="the shard folder the teacher was trained on")],
    out: Annotated[Path, typer.Option(help="the student's run folder, e.g. runs/student; re-running resumes it")],
    recipe: Annotated[Path | None, typer.Option(help="student recipe (default ensembles/student.toml)")] = None,
    unlabeled: Annotated[str | None, typer.Option(help="test (the test split's images, taught by the TTA prediction of the teacher's fold 0 models, for --all of its whole ensemble; the default when it has images) | none")] = None,
    epochs: Annotated[int | None, typer.Option(help="replaces the student's epochs (recorded in OUT/overrides.json)")] = None,
    time_budget: Annotated[str | None, typer.Option(help="wall-clock budget of the selection run, e.g. 20m (not with --epochs)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="then retrain on every labeled image for the chosen epoch count; that model is the run's (may be added to a finished run: its fold 0 is reused)")] = False,
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp16 (GPU only) | no")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    progress: Annotated[str, typer.Option(help="auto | live | plain | none")] = "auto",
) -> None:
    with user_errors():
        from marsseg.budget import parse_duration
        from marsseg.distill import DEFAULT_RECIPE, DistillOptions
        from marsseg.distill import distill as run

        opts = DistillOptions(precision=precision, threads=threads, unlabeled=unlabeled,
                              epochs=epochs, all=all_, progress=progress,
                              time_budget=parse_duration(time_budget) if time_budget else None)
        run(ensemble, data, out, recipe or DEFAULT_RECIPE, opts)
