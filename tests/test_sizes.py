"""`.ci/sizes.py` (run by `make lint`): names long files and functions and fails on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SIZES = Path(__file__).resolve().parents[1] / ".ci" / "sizes.py"


def sizes(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SIZES), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def function(name: str, lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f"{indent}def {name}():\n{body}{indent}    return 0\n"


def test_long_functions_and_files_are_named_and_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "ok.py").write_text(function("fits", 80) + "\n" + function("short", 3))
    (pkg / "long.py").write_text(
        "import functools\n\n\n@functools.cache\n" + function("too_long", 81) + "\n\nclass C:\n"
        + function("method", 82, indent="    "))
    r = sizes(pkg, "--max-file", 150)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [
        f"{pkg / 'long.py'}::170 (file over 150 lines)",
        f"{pkg / 'long.py'}:too_long:81 (function over 80 lines)",
        f"{pkg / 'long.py'}:C.method:82 (function over 80 lines)",
    ]


def test_clean_tree_passes_and_a_missing_path_is_named(tmp_path):
    (tmp_path / "a.py").write_text(function("f", 80))
    r = sizes(tmp_path)
    assert (r.returncode, r.stdout) == (0, "")
    r = sizes(tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip() == f"{tmp_path / 'nope'}: no such file or folder"
