"""marsseg-cli prepare: validate an npz and write HDF5 shards + dataset.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ._app import app, user_errors
from ._options import legacy_path, path_option


@app.command("prepare")
def prepare(
    data: Annotated[Path | None, typer.Option("--data", help="Input .npz in the course layout.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output shard folder (must not exist).", show_default=False)] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard file.")] = 1024,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace an existing shard folder (after the new one is built)."
        ),
    ] = False,
    outlier_min_count: Annotated[
        int,
        typer.Option(
            "--outlier-min-count",
            help="Flag a multi-class mask shared identically by at least this many images.",
        ),
    ] = 10,
    max_background: Annotated[
        float,
        typer.Option(
            "--max-background", help="Background share above which 'train_clean' drops an image."
        ),
    ] = 0.8,
    data_arg: Annotated[Path | None, legacy_path("IN")] = None,
    out_arg: Annotated[Path | None, legacy_path("OUT")] = None,
) -> None:
    """Validate an npz and write HDF5 shards + dataset.json; flags outliers, never drops them."""
    from marsseg.data import prepare as run_prepare

    src, out_dir = path_option(data, data_arg, "--data"), path_option(out, out_arg, "--out")
    with user_errors():
        t = time.perf_counter()
        info = run_prepare(src, out_dir, shard_size, force, outlier_min_count, max_background)
        tr, te, cl = info["splits"]["train"], info["splits"]["test"], info["cleaning"]
        flagged = ", ".join(str(g["count"]) for g in cl["duplicate_mask_groups"]) or "none"
        print(
            f"wrote {out_dir}: {tr['count']} train in {len(tr['shards'])} shard(s), "
            f"{te['count']} test ({'labeled' if te['labeled'] else 'unlabeled'}) "
            f"in {len(te['shards'])} shard(s) ({time.perf_counter() - t:.1f} s)"
        )
        print(
            f"flagged {len(cl['outlier_ids'])} duplicate-mask outliers (groups: {flagged}); "
            f"{cl['high_background_count']} images over {cl['max_background']:.0%} background; "
            f"{cl['train_clean_count']} remain after cleaning"
        )
