"""marsseg-cli select: choose ensemble members and weights by out-of-fold score."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from marsseg.runfolder import ENSEMBLE, RunFolder

from ._app import app, user_errors
from .calibrate import print_calibration


@app.command("select", help=f"Pick members and weights by out-of-fold mIoU, fit temperatures for them (as calibrate does) and write both into {ENSEMBLE}.")
def select(
    run: Annotated[Path, typer.Option("--run", "--ensemble", help=f"train-folds run folder (has {ENSEMBLE})")],
    data: Annotated[Path | None, typer.Option(help=f"prepared shard folder the run was trained on (default: recorded in {ENSEMBLE}); other data is refused")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="greedy steps (default 2 x members)")] = None,
) -> None:
    with user_errors():
        from marsseg.select import select_run

        sel = select_run(run, data=data, max_steps=max_steps)
        table = Table(title=f"member selection for {run}")
        table.add_column("member")
        table.add_column("OOF mIoU", justify="right")
        table.add_column("weight", justify="right")
        for name, score in sorted(sel.single.items(), key=lambda kv: -kv[1]):
            table.add_row(name, f"{100 * score:.2f}", f"{sel.weights.get(name, 0.0):.2f}")
        Console().print(table)
        print(f"selected ensemble OOF mIoU {100 * sel.oof_miou:.2f} -> {RunFolder(run).ensemble}")
        print_calibration(sel.calibration, RunFolder(run).ensemble)
