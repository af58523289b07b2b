"""marsseg-cli: one file per command in this folder, all joined on one typer app.

Installed as ``marsseg.cli``. Every public module here registers its command(s)
on ``cli._app.app`` when imported.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._app import app

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def main() -> None:
    app()


__all__ = ["app", "main"]
