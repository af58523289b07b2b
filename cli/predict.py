"""marsseg-cli predict: ensemble + flip TTA over shards -> submission CSV (+ probs.h5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.runfolder import ENSEMBLE

from ._app import app, user_errors
from ._options import Backend, BatchSize, Device, Folds, Members, Precision, Quiet, parse_list


@app.command("predict")
def predict(
    ensemble: Annotated[Path, typer.Option(help=f"run folder ({ENSEMBLE}) or one fold folder")],
    data: Annotated[Path, typer.Option(help="prepared shard folder or an .npz in the course layout")],
    out: Annotated[Path, typer.Option(help="submission CSV to write (its folder must exist)")],
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="average over horizontal flips")] = True,
    tta_vflip: Annotated[bool, typer.Option(help="also vertical flips (4 views)")] = False,
    members: Members = None,
    folds: Folds = None,
    batch_size: BatchSize = 64,
    precision: Precision = "auto",
    classes: Annotated[str, typer.Option(help="foreground: argmax over classes 1-4 (course metric) | all: 5-class masks")] = "foreground",
    probs: Annotated[Path | None, typer.Option(help="also write averaged probabilities (f16) and member disagreement to this HDF5 file")] = None,
    workers: Annotated[int, typer.Option(min=0, help="spread batches over N Ray workers (0/1: in process)")] = 0,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local one)")] = None,
    split: Annotated[str, typer.Option(help="split to predict")] = "test",
    device: Device = None,
    channels_last: Annotated[bool, typer.Option(help="channels_last memory format")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="same as --backend compile")] = False,
    backend: Backend = "auto",
    quiet: Quiet = False,
) -> None:
    """Predict masks with the run's ensemble and write the submission CSV."""
    with user_errors():
        from marsseg.inference import PredictConfig
        from marsseg.predict import predict as run_predict

        cfg = PredictConfig(tta=tta, tta_vflip=tta_vflip, batch_size=batch_size,
                            precision=precision, classes=classes, channels_last=channels_last,
                            compile=compile, device=device, backend=backend)
        r = run_predict(ensemble, data, out, cfg=cfg, members=parse_list(members, "--members"),
                        folds=parse_list(folds, "--folds", int), probs_path=probs, workers=workers,
                        address=address, split=split, progress=not quiet)
        print(f"wrote {r.rows} rows to {r.csv} ({len(r.models)} models x {r.views} "
              f"views, {r.backend} {r.precision} on {r.device}, {r.images_per_s:.0f} img/s"
              + (f" after {r.setup_seconds:.1f} s backend setup" if r.setup_seconds >= 1 else "")
              + ")"
              + (f"; probabilities in {r.probs}" if r.probs else ""))
