"""The typer app object and the error boundary shared by every command file."""

from __future__ import annotations

import contextlib
import sys

import typer

from marsseg.errors import InputError

app = typer.Typer(
    name="marsseg-cli",
    help="Mars terrain segmentation: prepare data, train k-fold ensembles, predict with TTA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def user_errors():
    """Turn InputError into one line on stderr and exit code 2; Ctrl-C into exit 130."""
    try:
        yield
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
