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
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

#: errors that mean "this place cannot be written", reported as one line naming the target
_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


#: the one name rule for what names a file or folder (recipe, member, shard file): letters,
#: digits, '_', '-', '.', starting with a letter or digit; so no separator, no "..", nothing
#: absolute, no control character. Checked with fullmatch ("$" would accept a trailing "\n").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


#: longest name: a member name becomes a folder and part of file names (255 bytes at most)
NAME_MAX = 100


def valid_name(name) -> bool:
    """True when `name` is a string of at most `NAME_MAX` characters that follows `NAME_RE`
    in full."""
    return name_problem(name) is None


def name_problem(name) -> str | None:
    """Why `name` breaks the name rule (one phrase), or None when it follows it."""
    if not isinstance(name, str):
        return f"{name!r} is not a string"
    if len(name) > NAME_MAX:
        return (f"{name[:20]!r}... is not a valid name: {len(name)} characters long, "
                f"at most {NAME_MAX}")
    if not NAME_RE.fullmatch(name):
        return (f"{name!r} is not a valid name (letters, digits, '_', '-', '.', starting "
                "with a letter or a digit: it names a folder)")
    return None


def inside(folder: str | os.PathLike, rel: str | os.PathLike, what: str) -> Path:
    """``folder / rel`` after checking that it stays in `folder`: every part of `rel`
    follows the name rule, and with symlinks resolved the path is still inside `folder`
    (a link to another run or shard folder is refused). InputError naming `what`."""
    folder = Path(folder)
    parts = Path(rel).parts if isinstance(rel, (str, os.PathLike)) and str(rel) else ()
    if not parts or not all(valid_name(p) for p in parts) or Path(rel).is_absolute():
        raise InputError(f"{what}: {str(rel)!r} is not a name inside {folder} (letters, digits, "
                         "'_', '-', '.'; no separator other than '/', no '..', not absolute)")
    path = folder.joinpath(*parts)
    root = folder.resolve()
    target = path.resolve()
    if target != root and root not in target.parents:
        raise InputError(f"{path}: leads outside {folder} (a symbolic link to {target}); "
                         f"{what} must stay inside it")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def temp_name(path: Path, hidden: bool = False) -> Path:
    """`<name>.tmp-<pid>` beside `path` (`.<name>.tmp-<pid>` when `hidden`): one writer
    process, one temporary name."""
    return path.with_name(f"{'.' if hidden else ''}{path.name}.tmp-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid runs on this host (or cannot be signalled)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_leftovers(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Entries of `folder` named ``<prefix><pid><suffix>`` whose pid no longer runs here:
    what a writer killed by SIGKILL (or a power cut) left behind."""
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):len(name) - len(suffix)]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            out.append(folder / name)
    return out


def remove_leftovers(path: Path, hidden: bool = False) -> None:
    """Remove the temporary names of dead writers of `path` (``<name>.tmp-<pid>``), and
    an old copy moved aside by a folder swap (``<name>.old-<pid>``) once `path` is whole."""
    for dot in (".", "") if hidden else ("",):  # (a hidden writer's older, visible names too)
        for p in dead_leftovers(path.parent, f"{dot}{path.name}.tmp-"):
            _remove(p)
    if path.exists():
        for p in dead_leftovers(path.parent, f"{path.name}.old-"):
            _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


def no_space(e: BaseException) -> bool:
    """True for a disk-full error (errno ENOSPC/EDQUOT, or HDF5's and C++'s wording of it)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota" in text


def check_space(path: str | os.PathLike, need: int) -> None:
    """InputError naming `path` unless its folder's file system has `need` bytes (plus a
    margin) free. HDF5 cannot recover from a disk that fills mid-file (its cached chunks
    fail at close and the process crashes at exit), so its writers ask first."""
    path = Path(path)
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return
    free, need = st.f_bavail * st.f_frsize, int(need * 1.01) + (1 << 20)
    if free < need:
        raise InputError(f"{path}: cannot write (no space left on device: it needs "
                         f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, hidden: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` on success, remove it on error.

    The caller creates a file or a folder at the yielded path (``<name>.tmp-<pid>``,
    ``.<name>.tmp-<pid>`` when `hidden`); leftovers of dead processes under those names
    are removed first. A folder replaces an existing folder at `path` (the old one is
    moved aside first and put back if the rename fails). Permission, read-only and
    disk-full errors become an InputError naming `path` ("no space left on device").
    """
    path = Path(path)
    tmp = temp_name(path, hidden)
    _remove(tmp)  # left by an earlier process with this pid
    remove_leftovers(path, hidden)
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
        if no_space(e):
            raise InputError(f"{path}: cannot write (no space left on device)") from None
        if e.errno in _CANNOT_WRITE and e.filename in (str(tmp), str(path), str(path.parent)):
            raise InputError(f"{path}: cannot write ({e.strerror})") from None
        raise
    except BaseException as e:
        _remove(tmp)
        if no_space(e) and not isinstance(e, InputError):
            raise InputError(f"{path}: cannot write (no space left on device)") from None
        raise


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a file in `folder`, so a read-only place fails before any work."""
    probe = Path(folder) / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise InputError(f"{folder}: cannot write ({e.strerror})") from None


def read_json(path: str | os.PathLike, what: str, hint: str = ""):
    """The JSON in `path`, or None when there is no such file. A file that cannot be read
    or is not JSON is one InputError naming it and `what` it is (then `hint`, if given)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read {what} ({e.__class__.__name__}: {e}){tail}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"{path}: {what} is not valid JSON ({e}){tail}") from None


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file.

    NaN is refused (JSON has none): callers store missing scores as null.
    """
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
