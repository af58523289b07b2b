#!/usr/bin/env python3
"""Report Python files and functions that are too long (run by `make lint`).

    python .ci/sizes.py marsseg cli [--max-file 450] [--max-function 80]

A file's length is its line count; a function's is from its `def` line to its last line
(decorators left out, docstring and comments in), nested functions and methods each
counted on their own too. Prints one `path:function:lines` line per excess (`path::lines`
for a whole file) and exits 1 when there is any, 0 otherwise, 2 on a path it cannot read.
Why not ruff's PLR0915: it counts statements, so a function of 150 lines of long calls
passes; the limit here is about what fits on a screen (STYLE.md, "Phases you can read").
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        else:
            yield from _functions(node, prefix)


def excesses(path: Path, max_file: int, max_function: int) -> list[str]:
    """`path:function:lines` for every function over `max_function` lines, `path::lines` when
    the file is over `max_file` lines."""
    text = path.read_text()
    out = []
    n = len(text.splitlines())
    if n > max_file:
        out.append(f"{path}::{n} (file over {max_file} lines)")
    for name, lines in _functions(ast.parse(text, filename=str(path))):
        if lines > max_function:
            out.append(f"{path}:{name}:{lines} (function over {max_function} lines)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="files or folders (searched for *.py)")
    ap.add_argument("--max-file", type=int, default=450)
    ap.add_argument("--max-function", type=int, default=80)
    args = ap.parse_args(argv)
    found = []
    for root in args.paths:
        if not root.exists():
            print(f"{root}: no such file or folder", file=sys.stderr)
            return 2
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            try:
                found += excesses(path, args.max_file, args.max_function)
            except (OSError, UnicodeDecodeError, SyntaxError) as e:
                print(f"{path}: cannot read ({type(e).__name__}: {e})", file=sys.stderr)
                return 2
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
