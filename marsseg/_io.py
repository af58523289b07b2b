"""Small file helpers shared by the stages: content hashes and atomic writes.

Every file or folder marsseg writes goes through `atomic_path`: the writer fills a
temporary name beside the target, which is renamed into place only on success and
removed on any error (Ctrl-C included), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

#: errors that mean "this place cannot be written", reported as one line naming the target
_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def temp_name(path: Path) -> Path:
    """`<name>.tmp-<pid>` beside `path`: one writer process, one temporary name."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` on success, remove it on error.

    The caller creates a file or a folder at the yielded path. A folder replaces an
    existing folder at `path` (the old one is moved aside first and put back if the
    rename fails). Permission, read-only and disk-full errors on the temporary name
    become an InputError naming `path`.
    """
    path = Path(path)
    tmp = temp_name(path)
    _remove(tmp)  # left by an earlier process with this pid
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno in _CANNOT_WRITE and e.filename in (str(tmp), str(path), str(path.parent)):
            raise InputError(f"{path}: cannot write ({e.strerror})") from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a file in `folder`, so a read-only place fails before any work."""
    probe = Path(folder) / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"{folder}: cannot write ({e.strerror})") from None


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file.

    NaN is refused (JSON has none): callers store missing scores as null.
    """
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
