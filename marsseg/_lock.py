"""An exclusive file lock (flock) that names its holder, for run folders and their folds.

The kernel drops a flock when the holding process exits however it ends (kill -9
included), so the lock of a dead process is simply taken over and never blocks.
The holder writes its host, pid and command into the file for the message a
second process gets; a lock file is never deleted (that would race with takers).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h['pid']} on host {h['host']} (since {h.get('since', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its host and pid not yet written)"


@contextlib.contextmanager
def file_lock(path: Path, what: str, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created); after `wait` seconds, an InputError
    naming `what` and the holder (host, pid). The holder's host and pid are written into
    the file for that message and cleared on release."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"{path.parent}: cannot write ({e.strerror})") from None
    try:
        deadline = time.monotonic() + wait
        locked = True
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise InputError(f"{what} is in use by {_holder(path)}; wait for it to "
                                     f"finish or stop it") from None
                time.sleep(0.2)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.warning("%s: this filesystem has no locks; not locking", path)
                locked = False
                break
        if locked:
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except OSError as e:  # a full disk: the lock is held, but nothing can be written
                raise InputError(f"{path.parent}: cannot write ({e.strerror.lower()})") from None
        yield
        if locked:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def folder_lock(folder: Path, shared: bool, busy: str) -> Iterator[None]:
    """Hold a flock on the folder itself (no file is written into it, so a read-only
    folder can be locked): shared by its readers, exclusive by the one process that
    replaces it. A conflicting holder is an InputError `busy`, at once (never a wait)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise InputError(f"{folder}: cannot open ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(busy) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: this filesystem has no locks; not locking", folder)
        yield
    finally:
        os.close(fd)
