"""marsseg-cli calibrate: fit temperatures on the out-of-fold predictions (select runs it too)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.runfolder import ENSEMBLE

from ._app import app, user_errors


def print_calibration(cal, where) -> None:
    """The fitted temperatures and the ensemble's OOF NLL / ECE / mIoU per candidate."""
    from rich.console import Console
    from rich.table import Table

    fits = cal.evidence["fits"]
    t = Table(title="temperature fits on out-of-fold labeled pixels (NLL in nats)")
    for col in ("fit", "T", "NLL before", "NLL after"):
        t.add_column(col, justify="left" if col == "fit" else "right")
    rows = [("ensemble", fits["ensemble"])] + [(f"member {n}", f) for n, f in fits["members"].items()]
    for name, f in rows:
        t.add_row(name, f"{f['temperature']:.3f}" + (" (bound)" if f["at_bound"] else ""),
                  f"{f['nll_before']:.4f}", f"{f['nll_after']:.4f}")
    s = Table(title="ensemble out of fold: which temperatures to apply")
    for col in ("temperatures", "NLL", "ECE (%)", "mIoU (%)"):
        s.add_column(col, justify="left" if col == "temperatures" else "right")
    for c, r in cal.evidence["oof"].items():
        s.add_row(c + (" (applied)" if c == cal.applied else ""), f"{r['nll']:.4f}",
                  f"{100 * r['ece']:.2f}", f"{100 * r['miou']:.2f}")
    con = Console()
    con.print(t)
    con.print(s)
    print(f"applied: {cal.applied} temperatures ({cal.evidence['chosen_by']}) -> {where}")


@app.command("calibrate", help=f"Fit temperatures on the out-of-fold predictions and store them in {ENSEMBLE}.")
def calibrate(
    run: Annotated[Path, typer.Option("--run", "--ensemble", help=f"train-folds run folder (has {ENSEMBLE})")],
    data: Annotated[Path | None, typer.Option(help=f"prepared shard folder the run was trained on (default: recorded in {ENSEMBLE}); other data is refused")] = None,
) -> None:
    with user_errors():
        from marsseg.runfolder import RunFolder
        from marsseg.temperature import calibrate_run

        cal = calibrate_run(run, data=data)
        print_calibration(cal, RunFolder(run).ensemble)
