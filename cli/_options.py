"""Options shared by several commands, and the one parser for list options.

Convention (README "Command line"): every path is a named option: `--data` what a
command reads, `--out` what it writes, `--ensemble`/`--recipe`/`--run` the rest.
`synth`, `prepare` and `inspect` took positional paths before; that form is still
accepted (hidden from --help) so existing job scripts keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from marsseg.errors import InputError
from marsseg.runfolder import ENSEMBLE

# typer bundles its own click; reach its UsageError through an exception typer exports.
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

Members = Annotated[list[str] | None, typer.Option(
    help=f"member names (default: selected in {ENSEMBLE}); repeat or comma-separate")]
Folds = Annotated[list[str] | None, typer.Option(
    help="fold numbers (default: all); repeat or comma-separate")]
BatchSize = Annotated[int, typer.Option(min=1, help="images per forward pass (x views)")]
Precision = Annotated[str, typer.Option(
    help="auto (GPU: bf16 if supported, else fp16; CPU: bf16 only with native bf16 matmul, "
         "else fp32) | bf16 | fp16 (GPU only) | no (fp32)")]
Device = Annotated[str | None, typer.Option(
    help="torch device (default: cuda if available, else cpu)")]
Backend = Annotated[str, typer.Option(
    help="auto (openvino on a CPU in bf16 when installed, else eager) | eager | compile "
         "(AOTInductor, frozen) | openvino | openvino-int8 (CPU); conversions are cached in "
         "each fold folder")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]


def parse_list(values: list[str] | None, what: str, cast=str) -> tuple | None:
    """`--folds 0,1 --folds 3` -> (0, 1, 3); None when not given.

    InputError naming the option (`what`) for an empty list or an item `cast` rejects.
    """
    if values is None:
        return None
    items = [v.strip() for item in values for v in item.split(",") if v.strip()]
    if not items:
        raise InputError(f"{what}: empty list")
    try:
        return tuple(cast(v) for v in items)
    except ValueError:
        raise InputError(f"{what}: expected a comma-separated list of "
                         f"{'numbers' if cast is int else 'names'}, got {','.join(items)!r}") from None


def path_option(option: Path | None, positional: Path | None, flag: str) -> Path:
    """The path given as `flag`, or in the older positional form; a usage error if neither
    or both are given (one line, exit 2, like click's own)."""
    # click attaches the command's context to a UsageError raised in its callback
    if option is not None and positional is not None:
        raise _UsageError(f"{flag} given twice: as {flag} {option} and as argument {positional}")
    if option is None and positional is None:
        raise _UsageError(f"Missing option '{flag}'.")
    return option if option is not None else positional


def legacy_path(name: str) -> typer.models.ArgumentInfo:
    """A hidden positional path argument kept for the old `synth OUT` / `prepare IN OUT` form."""
    return typer.Argument(hidden=True, metavar=name, show_default=False)
