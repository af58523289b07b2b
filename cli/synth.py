"""marsseg-cli synth: write a synthetic Mars-like data set in the course npz layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ._app import app, user_errors
from ._options import legacy_path, path_option


@app.command("synth")
def synth(
    out: Annotated[Path | None, typer.Option("--out", help="Output .npz file (replaced if it exists).", show_default=False)] = None,
    n_train: Annotated[int, typer.Option("--n-train", help="Training images.")] = 400,
    n_test: Annotated[int, typer.Option("--n-test", help="Test images (with test_masks).")] = 120,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same file.")] = 0,
    n_outliers: Annotated[
        int | None,
        typer.Option(
            "--n-outliers",
            help="Training images sharing one identical 'alien' mask "
            "[default: 5% of --n-train, at least 12, at most 110; 0 below 48 images].",
            show_default=False,
        ),
    ] = None,
    out_arg: Annotated[Path | None, legacy_path("OUT")] = None,
) -> None:
    """Write synthetic Mars-like terrain in the course npz layout (deterministic per seed)."""
    from marsseg.synth import default_n_outliers, write_synthetic

    out = path_option(out, out_arg, "--out")
    with user_errors():
        t = time.perf_counter()
        write_synthetic(out, n_train, n_test, seed, n_outliers)
        k = default_n_outliers(n_train) if n_outliers is None else n_outliers
        print(
            f"wrote {out}: {n_train} train ({k} outliers sharing one mask), "
            f"{n_test} test with masks, seed {seed} ({time.perf_counter() - t:.1f} s)"
        )
