"""marsseg-cli: one file per command in this folder, all joined on one typer app.

Installed as ``marsseg.cli``. Every public module here registers its command(s)
on ``cli._app.app`` when imported.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys

from ._app import EXIT_TERMINATED, app

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def _terminated_outside_a_command(signum, frame):
    # A command's own handler (cli._app.user_errors) unwinds it; before it starts or once
    # it has finished (printing, interpreter exit), its work is either not begun or
    # committed, so say so and leave at once.
    sys.stdout.flush()
    print("terminated", file=sys.stderr, flush=True)
    os._exit(EXIT_TERMINATED)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated_outside_a_command)
    app()


__all__ = ["app", "main"]
