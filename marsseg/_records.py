"""Checks of the hand-editable JSON records of a run folder: every key a reader relies on,
each failure an InputError naming the file and the key. `runfolder` reads and writes them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ._io import valid_name
from .errors import InputError

_SHA_RE = re.compile(r"[0-9a-f]{64}")



def check_ensemble(spec, path: Path) -> None:
    """Every key readers use: members[i].name, .weight (finite, >= 0), .folds[j].fold/.path."""
    if not isinstance(spec, dict) or not isinstance(spec.get("members"), list):
        raise InputError(f"{path}: no 'members' list")
    for i, m in enumerate(spec["members"]):
        key = f"members[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise InputError(f"{path}: {key}.name must be a non-empty string")
        if not valid_name(m["name"]):
            raise InputError(f"{path}: {key}.name {m['name']!r} is not a member name (letters, "
                             "digits, '_', '-', '.'; it names a folder of the run)")
        w = m.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise InputError(f"{path}: {key}.weight ({m['name']}) must be a finite number >= 0, "
                             f"got {w!r}")
        folds = m.get("folds", [])
        if not isinstance(folds, list):
            raise InputError(f"{path}: {key}.folds must be a list")
        for j, f in enumerate(folds):
            fk = f"{key}.folds[{j}]"
            if not isinstance(f, dict) or not isinstance(f.get("fold"), int) \
                    or isinstance(f.get("fold"), bool) or f["fold"] < 0:
                raise InputError(f"{path}: {fk}.fold must be an integer >= 0")
            p = f.get("path")
            if p is not None and (not isinstance(p, str)
                                  or not all(valid_name(q) for q in p.split("/"))):
                raise InputError(f"{path}: {fk}.path must be a path inside the run folder, got {p!r}")
            sha = f.get("sha256")  # required where weights are loaded (ensemble.load_ensemble)
            if sha is not None and (not isinstance(sha, str) or not _SHA_RE.fullmatch(sha)):
                raise InputError(f"{path}: {fk}.sha256 ({m['name']} fold {f['fold']}) must be the "
                                 "weights' sha256 (64 hex digits); without it they cannot be "
                                 "checked")
    sel = spec.get("selected")
    if sel is not None and (not isinstance(sel, list) or not all(isinstance(s, str) for s in sel)):
        raise InputError(f"{path}: 'selected' must be a list of member names")
