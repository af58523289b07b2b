"""marsseg-cli train-folds: train a recipe's k-fold ensemble on Ray (or in-process)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.runfolder import ENSEMBLE

from ._app import app, user_errors
from ._options import parse_list


@app.command("train-folds", help=f"Train every (member, fold) of RECIPE on DATA into OUT; writes {ENSEMBLE}.")
def train_folds(
    data: Annotated[Path, typer.Option(help="prepared shard folder (marsseg-cli prepare)")],
    recipe: Annotated[Path, typer.Option(help="recipe TOML, e.g. ensembles/seed-final.toml")],
    out: Annotated[Path, typer.Option(help="run folder, e.g. runs/<name>; re-running resumes it")],
    precision: Annotated[str, typer.Option(help="auto (GPU: bf16 if supported, else fp16; CPU: bf16 only with native bf16 matmul, else fp32) | bf16 | fp16 (GPU only) | no (fp32)")] = "auto",
    cpus_per_task: Annotated[float, typer.Option(help="CPUs Ray reserves per (member, fold) task")] = 1.0,
    gpus_per_task: Annotated[float, typer.Option(help="GPUs per task (per worker with --workers-per-fold): 0, a fraction that shares a GPU (e.g. 0.5) or 1")] = 0.0,
    workers_per_fold: Annotated[int, typer.Option(help="data-parallel workers per (member, fold) on Ray Train: one GPU each with --gpus-per-task 1, else CPU processes (gloo); batch_size stays the global batch")] = 1,
    threads: Annotated[int | None, typer.Option(help="torch threads per task (default: int(cpus-per-task); --sequential: torch's default)")] = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster (e.g. auto or head:6379) instead of starting a local one")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="train in this process one fold after another, without Ray")] = False,
    members: Annotated[list[str] | None, typer.Option(help="member names to train (default: all); repeat or comma-separate")] = None,
    folds: Annotated[list[str] | None, typer.Option(help="fold numbers to train (default: all); repeat or comma-separate")] = None,
    max_retries: Annotated[int, typer.Option(help="Ray retries of a task whose worker died; it resumes from its state/")] = 3,
    progress: Annotated[str, typer.Option(help="auto (live table on a terminal, plain lines otherwise) | live | plain | none")] = "auto",
    epochs: Annotated[int | None, typer.Option(help="training budget: replaces every member's epochs (recorded in OUT/overrides.json)")] = None,
    log_with: Annotated[list[str] | None, typer.Option(help="log each (member, fold) to an accelerate tracker: tensorboard (RUN/tb), mlflow (sqlite RUN/mlflow.db unless MLFLOW_TRACKING_URI), wandb, ...; repeat or comma-separate (tensorboard and mlflow: pip install 'marsseg[track]')")] = None,
    time_budget: Annotated[str | None, typer.Option(help="wall-clock budget per fold, e.g. 90s, 12m, 1.5h: each fold's epochs come from a timing probe before epoch 0 and are kept in its budget.json (not with --epochs)")] = None,
    teacher: Annotated[Path | None, typer.Option(help="a finished run folder on the same data with this run's folds (k, split seed): fold k's training part (never validation) gets the test images pseudo-labelled by the teacher's fold-k models (flip TTA), so out-of-fold scores stay honest; pixels below the members' pseudo_threshold are ignored")] = None,
    reuse: Annotated[list[str] | None, typer.Option(help="run folders (repeat or comma-separate, searched in order) whose finished folds are copied instead of trained when they are provably the fold this command would train: same train shards, splits, recipe seed, member block (after --epochs), --teacher, precision, device and workers, no --time-budget; each fold that differs is trained, and a line names its first difference")] = None,
) -> None:
    with user_errors():
        from marsseg.budget import parse_duration
        from marsseg.orchestrate import RunOptions
        from marsseg.orchestrate import train_folds as run

        opts = RunOptions(precision=precision, cpus_per_task=cpus_per_task,
                          gpus_per_task=gpus_per_task, threads=threads, address=address,
                          sequential=sequential, members=parse_list(members, "--members"),
                          folds=parse_list(folds, "--folds", int), max_retries=max_retries,
                          progress=progress, workers_per_fold=workers_per_fold,
                          log_with=parse_list(log_with, "--log-with") or (),
                          time_budget=parse_duration(time_budget) if time_budget is not None else None,
                          teacher=str(teacher) if teacher is not None else None,
                          reuse=parse_list(reuse, "--reuse") or ())
        run(recipe, data, out, opts, epochs=epochs)
