"""marsseg-cli inspect: counts, class shares before/after cleaning, outliers, background histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app, user_errors
from ._options import legacy_path, path_option


def _ids(ids: list[int], limit: int = 12) -> str:
    head = ", ".join(str(i) for i in ids[:limit])
    return head + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")


def _render(d: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from marsseg import CLASS_NAMES

    con = Console(width=max(100, Console().width))
    c = d["counts"]
    te = d["test"]
    grp = f", {d['train']['groups']} groups" if d["train"]["groups"] else ""
    con.print(
        f"[bold]{d['path']}[/] ({d['kind']}): {c['train']} train images{grp}, "
        f"{te['count']} test ({'labeled' if te['labeled'] else 'unlabeled'})"
    )

    px = d["class_pixel_counts"]
    t = Table(title="Class pixel shares")
    t.add_column("class")
    t.add_column(f"train ({c['train']})", justify="right")
    t.add_column(f"train clean ({c['train_clean']})", justify="right")
    if px["test"] is not None:
        t.add_column(f"test ({te['count']})", justify="right")
    tot = {k: max(1, sum(v)) for k, v in px.items() if v is not None}
    for i, name in enumerate(CLASS_NAMES):
        row = [f"{i} {name}"] + [
            f"{100 * px[k][i] / tot[k]:.2f}%" for k in ("train", "train_clean")
        ]
        if px["test"] is not None:
            row.append(f"{100 * px['test'][i] / tot['test']:.2f}%")
        t.add_row(*row)
    con.print(t)
    con.print(
        f"cleaning: drop {c['outliers']} duplicate-mask outliers and "
        f"{c['high_background']} images over {d['max_background']:.0%} background "
        f"-> {c['train_clean']} of {c['train']} kept; {c['big_rock_images']} train images hold big rock"
    )

    groups = d["duplicate_mask_groups"]
    if groups:
        for g in groups:
            con.print(
                f"outliers: {g['count']} images share one mask (classes {g['classes']}): ids {_ids(g['ids'])}"
            )
    else:
        con.print(
            f"outliers: none (no multi-class mask shared by {d['outlier_min_count']}+ images)"
        )
    for g in d["uniform_duplicate_groups"]:
        con.print(
            f"  not flagged: {g['count']} images share a single-class mask (class {g['classes']}), "
            f"ids {_ids(g['ids'], 6)}"
        )

    h = d["bg_fraction_histogram"]
    con.print("background fraction per image (train" + (" | test)" if h["test"] else ")"))
    peak = max(h["train"] + (h["test"] or []) + [1])
    for b in range(len(h["edges"]) - 1):
        lo, hi = h["edges"][b], h["edges"][b + 1]
        n = h["train"][b]
        line = f"  {lo:.1f}-{hi:.1f} {n:6d} {'#' * round(30 * n / peak):<30}"
        if h["test"]:
            m = h["test"][b]
            line += f" | {m:6d} {'#' * round(30 * m / peak)}"
        con.print(line, highlight=False)


@app.command("inspect")
def inspect(
    data: Annotated[Path | None, typer.Option(
        "--data", help="An .npz in the course layout or a prepared shard folder.",
        show_default=False)] = None,
    max_background: Annotated[
        float,
        typer.Option(
            "--max-background", help="Cleaning drops images with more background than this share."
        ),
    ] = 0.8,
    outlier_min_count: Annotated[
        int,
        typer.Option(
            "--outlier-min-count",
            help="npz only: flag a multi-class mask shared by at least this many images.",
        ),
    ] = 10,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON instead.")
    ] = False,
    data_arg: Annotated[Path | None, legacy_path("DATA")] = None,
) -> None:
    """Show counts and class pixel shares before and after cleaning, outliers, background histogram."""
    from marsseg.data import describe

    data = path_option(data, data_arg, "--data")
    with user_errors():
        d = describe(data, max_background, outlier_min_count)
        if json_out:
            import json

            print(json.dumps(d, indent=1))
        else:
            _render(d)
