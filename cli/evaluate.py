"""marsseg-cli evaluate: scores of each fold, the ensemble and the ensemble + TTA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.runfolder import ENSEMBLE, SPLITS

from ._app import app, user_errors
from ._options import Backend, BatchSize, Device, Folds, Members, Precision, Quiet, parse_list


@app.command("evaluate")
def evaluate(
    ensemble: Annotated[Path, typer.Option(help=f"run folder ({ENSEMBLE}) or one fold folder")],
    data: Annotated[Path, typer.Option(help="prepared shard folder or .npz with labeled test images (test_masks)")],
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="also score with flip TTA")] = True,
    tta_vflip: Annotated[bool, typer.Option(help="TTA also with vertical flips (4 views)")] = False,
    split: Annotated[str | None, typer.Option(help=f"test (needs masks) | train (out-of-fold, via {SPLITS}; the run's own data only); default: test if labeled, else train")] = None,
    members: Members = None,
    folds: Folds = None,
    batch_size: BatchSize = 64,
    precision: Precision = "auto",
    classes: Annotated[str, typer.Option(help="foreground (as submitted) | all")] = "foreground",
    device: Device = None,
    backend: Backend = "auto",
    quiet: Quiet = False,
) -> None:
    """Score the run on labeled data: table on stdout, scores.json in the run folder."""
    with user_errors():
        from rich.console import Console

        from marsseg.evaluate import evaluate as run_evaluate
        from marsseg.evaluate import format_calibration, format_table
        from marsseg.inference import PredictConfig

        cfg = PredictConfig(tta=tta, tta_vflip=tta_vflip, batch_size=batch_size,
                            precision=precision, classes=classes, device=device,
                            backend=backend)
        result = run_evaluate(ensemble, data, cfg=cfg, members=parse_list(members, "--members"),
                              folds=parse_list(folds, "--folds", int), split=split, progress=not quiet)
        Console(width=max(120, Console().width)).print(format_table(result))
        print(format_calibration(result))
        print(f"scores: {result['path']}")
