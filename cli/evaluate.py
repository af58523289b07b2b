"""marsseg-cli evaluate: scores of each fold, the ensemble and the ensemble + TTA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.runfolder import ENSEMBLE, SPLITS

from ._app import app, user_errors
from .predict import int_list, split_list


@app.command("evaluate")
def evaluate(
    ensemble: Annotated[Path, typer.Option(help=f"run folder ({ENSEMBLE}) or one fold folder")],
    data: Annotated[Path, typer.Option(help="prepared shard folder or .npz with labeled test images (test_masks)")],
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="also score with flip TTA")] = True,
    tta_vflip: Annotated[bool, typer.Option(help="TTA also with vertical flips (4 views)")] = False,
    split: Annotated[str | None, typer.Option(help=f"test (needs masks) | train (out-of-fold, via {SPLITS}; the run's own data only); default: test if labeled, else train")] = None,
    members: Annotated[list[str] | None, typer.Option(help="members to use (default: selected); repeat or comma-separate")] = None,
    folds: Annotated[list[str] | None, typer.Option(help="fold numbers to use (default: all)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass (x views)")] = 64,
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp16 (GPU only) | no")] = "auto",
    classes: Annotated[str, typer.Option(help="foreground (as submitted) | all")] = "foreground",
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available)")] = None,
    backend: Annotated[str, typer.Option(help="eager | compile (AOTInductor, frozen) | openvino | openvino-int8 (CPU) | auto; conversions are cached in each fold folder")] = "eager",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Score the run on labeled data: table on stdout, scores.json in the run folder."""
    with user_errors():
        from rich.console import Console

        from marsseg.evaluate import evaluate as run_evaluate
        from marsseg.evaluate import format_table
        from marsseg.predict import PredictConfig

        cfg = PredictConfig(tta=tta, tta_vflip=tta_vflip, batch_size=batch_size,
                            precision=precision, classes=classes, device=device,
                            backend=backend)
        result = run_evaluate(ensemble, data, cfg=cfg, members=split_list(members),
                              folds=int_list(folds, "folds"), split=split, progress=not quiet)
        Console(width=max(120, Console().width)).print(format_table(result))
        print(f"scores: {result['path']}")
