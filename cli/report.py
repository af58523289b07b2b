"""marsseg-cli report: confusion matrix, per-class IoU, training curves, best/worst overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.runfolder import ENSEMBLE

from ._app import app, user_errors
from ._options import Backend, BatchSize, Folds, Members, Precision, Quiet, parse_list


@app.command("report")
def report(
    ensemble: Annotated[Path, typer.Option(help=f"run folder ({ENSEMBLE})")],
    out: Annotated[Path, typer.Option(help="folder for the PNGs (created; its parent must exist)")],
    data: Annotated[Path | None, typer.Option(help="labeled shards or .npz: scores + overlays computed now (else scores.json)")] = None,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="score and overlay with flip TTA")] = True,
    split: Annotated[str | None, typer.Option(help="test | train (out-of-fold); default: test if labeled")] = None,
    members: Members = None,
    folds: Folds = None,
    overlays: Annotated[int, typer.Option(min=0, help="images in each of the best/worst overlays")] = 4,
    batch_size: BatchSize = 64,
    precision: Precision = "auto",
    backend: Backend = "auto",
    quiet: Quiet = False,
) -> None:
    """Write the report PNGs of a run (and refresh scores.json when --data is given)."""
    with user_errors():
        from marsseg.inference import PredictConfig
        from marsseg.report import report as run_report

        cfg = PredictConfig(tta=tta, batch_size=batch_size, precision=precision, backend=backend)
        r = run_report(ensemble, out, data=data, cfg=cfg, members=parse_list(members, "--members"),
                       folds=parse_list(folds, "--folds", int), split=split, n_overlays=overlays,
                       progress=not quiet)
        for note in r["notes"]:
            print(f"note: {note}")
        for f in r["files"]:
            print(f"wrote {f}")
