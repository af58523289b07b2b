"""Outputs never touch inputs: `check_apart` refuses an output path that is, or lies in,
what a command reads (issue 19: `predict --out RUN/ensemble.json` destroyed the run).

Symbolic links are resolved first, so a link to an input is refused like the input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .runfolder import (
    BUDGET,
    CACHE,
    CONFIG,
    DATA,
    ENSEMBLE,
    LOCK,
    OVERRIDES,
    RECIPE,
    SCORES,
    SPLITS,
    RunFolder,
)

#: the run folder's own files at its top level (never an output of predict or report)
_RUN_FILES = (RECIPE, OVERRIDES, DATA, SPLITS, ENSEMBLE, SCORES, LOCK, BUDGET)


def _within(target: Path, root: Path) -> tuple[str, ...] | None:
    """`target`'s parts below `root` (both resolved), or None when it is not inside."""
    try:
        return target.relative_to(root).parts
    except ValueError:
        return None


def check_apart(out: str | os.PathLike, flag: str, *, run: str | os.PathLike | None = None,
                data: str | os.PathLike | None = None, files: Sequence = ()) -> None:
    """An output never touches an input: InputError (naming `flag`) when `out`, with
    symlinks resolved, is one of `files` or the npz `data`, lies in the shard folder
    `data`, is one of the run folder `run`'s own files or lies in one of its member or
    fold folders (a single fold folder: anywhere in it). New files beside a run's files
    (``runs/x/submission.csv``, ``runs/x/report/``) stay allowed."""
    target = Path(out).resolve()

    def refuse(what: str) -> None:
        raise InputError(f"{out}: {flag} would overwrite {what}, an input of this command; "
                         f"write it elsewhere")

    for f in [*files, *([data] if data is not None and Path(data).is_file() else [])]:
        if target == Path(f).resolve():
            refuse(str(f))
    shards = data is not None and (Path(data) / "dataset.json").is_file()
    if shards and _within(target, Path(data).resolve()) is not None:
        refuse(f"the shard folder {data}")
    if run is None:
        return
    rel = _within(target, Path(run).resolve())
    if rel is None:
        return
    if RunFolder(run).is_fold_folder() or not rel:
        refuse(f"the run folder {run}")
    top = Path(run).resolve() / rel[0]
    member = top.is_dir() and any(top.glob(f"*/{CONFIG}"))  # it holds fold folders
    if rel[0] in _RUN_FILES or member or rel[0] == CACHE:
        refuse(f"{Path(run) / rel[0]} of the run folder")
