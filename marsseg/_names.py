"""The one name rule for anything that names a file or folder: recipes, members, shards.

A name is 1..100 characters of letters, digits, '_', '-', '.', starting with a letter or a
digit: no path separators, no '..' component, not absolute, no control characters (the
whole name must match, so "a\\n" is refused), and short enough for any file system.
"""

from __future__ import annotations

import re

from .errors import InputError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_MAX = 100


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid name, or None when it is."""
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if len(name) > NAME_MAX:
        return (f"{name[:20]!r}... is not a valid name: {len(name)} characters long, "
                f"at most {NAME_MAX}")
    if not NAME_RE.fullmatch(name):
        return (f"{name!r} is not a valid name (letters, digits, '_', '-', '.', starting "
                "with a letter or a digit: it names a folder)")
    return None


def check_name(name: object, what: str) -> str:
    """``name`` when valid, else an InputError ``what: problem``."""
    problem = name_problem(name)
    if problem:
        raise InputError(f"{what}: {problem}")
    return name  # type: ignore[return-value]
