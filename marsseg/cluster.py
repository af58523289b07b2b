"""Start or join Ray, the same way for train-folds and predict.

Ray stays at the edge: only `orchestrate` (a task per fold) and `predict` (an
actor pool) use it, and both come through here. With an address, join that
cluster (``ray start``, Slurm). Without one, start a private instance: a bare
``ray.init()`` would join whatever cluster ``ray start`` last left running on
this machine. The private instance gets this machine's CPUs (or ``min_cpus``
when more is asked for, so that every predict actor gets its one CPU), runs
its workers at niceness 0 (Ray's default is 15, which would give work run
through Ray less CPU than the same work run in-process), shows Ray's warnings
but not its info lines, and no dashboard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator

from .errors import InputError, RunError

#: seconds a cluster address gets to answer a TCP connect before the command gives up
CONNECT_TIMEOUT = 5.0


def check_address(address: str | None, flag: str = "--address") -> None:
    """Fail fast, with one line, on a cluster address nothing answers at: an unknown host,
    a bad port, or no listener (``ray.init`` would retry for minutes). ``auto`` and
    ``local`` are left to Ray; ``ray://host:port`` is checked like ``host:port``."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port_text = hostport.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InputError(f"{flag} {address!r}: expected host:port, ray://host:port or auto")
    host = host.strip("[]")  # [::1]:6379
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"{flag} {address}: unknown host {host!r} ({e})") from None
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(CONNECT_TIMEOUT)
                s.connect(sockaddr)
            return
        except OSError as e:
            errors.append(e.strerror or str(e) or type(e).__name__)
    raise InputError(f"{flag} {address}: no Ray cluster answers there ({errors[0]}); start it "
                     "with `ray start --head` or leave --address out")


def start_ray(address: str | None = None, min_cpus: int = 0, fallback: str = "") -> None:
    """Join the Ray cluster at ``address``, or start a private one (module docstring).

    A start that fails (a local node that times out on a loaded machine, a cluster that
    does not answer) raises ``RunError``: one line naming what failed, then ``fallback``
    (what to do instead, e.g. "give --sequential")."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
              configure_logging=True)
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_cpus),
                     _system_config={"worker_niceness": 0}, **kw)
    except Exception as e:  # Ray raises a bare Exception when a local node times out
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever part of the node did start
        raise RunError(_start_failed(address, e, fallback)) from None
    finally:
        if callable(before):
            # ray.init replaces the driver's SIGTERM handler (and Ray's C++ core adds a
            # crash handler that dumps a stack and exits 1): put the caller's back, so
            # the CLI's SIGTERM still unwinds (temp files removed, Ray shut down, exit 143).
            signal.signal(signal.SIGTERM, before)


def _start_failed(address: str | None, e: Exception, fallback: str) -> str:
    """The one line for a Ray start-up that failed: what, Ray's first line, what to do."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    why = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if address:
        what = (f"Ray could not join the cluster at {address} ({why}): check that it runs "
                "(`ray status` on its head node) or leave --address out")
    else:
        what = (f"Ray could not start a local node ({why}): the machine may be overloaded; "
                "retry when it is less busy")
    return f"{what}, or {fallback}" if fallback else what


@contextlib.contextmanager
def ray_session(address: str | None = None, min_cpus: int = 0,
                fallback: str = "") -> Iterator[None]:
    """Use the Ray this process already joined, else start or join one (`start_ray`; a
    failed start is a ``RunError`` that ends with ``fallback``) and shut it down on the
    way out."""
    import ray

    if ray.is_initialized():
        yield
        return
    start_ray(address, min_cpus, fallback)
    try:
        yield
    finally:
        ray.shutdown()
