"""The typer app object and the error boundary shared by every command file.

Every way a command can end badly is one line on stderr and a fixed exit code:

- bad input (our ``InputError``, and click's own usage errors: a missing option,
  ``--batch-size x``, an unknown command): ``error: ...``, exit 2;
- a run stopped from outside (``RunError``: a worker killed for memory): ``error: ...``,
  exit 1;
- Ctrl-C (SIGINT): ``interrupted``, exit 130;
- SIGTERM (``scancel``, ``timeout``, ``kill``): ``terminated``, exit 143.

Both signals unwind the stack like an exception, so every ``finally`` that removes
a temporary file (``*.csv.tmp-<pid>``, ``*.h5.tmp-<pid>``, a half-built shard
folder) runs before the process exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import typer
from typer.core import TyperGroup

from marsseg.errors import InputError, RunError

EXIT_RUN = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


# typer >= 0.26 bundles its own click (typer._click) and exports only some of its
# exceptions; reach the base class through one it does export, for any typer version.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread; a KeyboardInterrupt so it takes Ctrl-C's path."""


class _OneLineErrors(TyperGroup):
    """Click's usage errors (missing option, bad int, unknown command) as ONE line, exit 2.

    Click prints a usage block plus the error (typer: a rich box). We run click
    non-standalone and print the message ourselves, like every other bad input.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rc = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `marsseg-cli`: the help
                if e.format_message().strip():  # typer has already printed it otherwise
                    print(e.format_message(), file=sys.stderr)
                sys.exit(EXIT_INPUT)
            where = e.ctx.command_path if getattr(e, "ctx", None) else "marsseg-cli"
            msg = " ".join(e.format_message().split())
            print(f"error: {where}: {msg} (see {where} --help)", file=sys.stderr)
            sys.exit(EXIT_INPUT)
        except typer.Abort:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        # Non-standalone click returns an Exit's code, or the command's return value (None).
        sys.exit(rc if isinstance(rc, int) else 0)


app = typer.Typer(
    name="marsseg-cli",
    cls=_OneLineErrors,
    help="Mars terrain segmentation: prepare data, train k-fold ensembles, predict with TTA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"marsseg-cli {version('marsseg')}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Mars terrain segmentation: prepare data, train k-fold ensembles, predict with TTA."""


_sigterm_seen = threading.Event()  # Ray's waits re-raise a plain KeyboardInterrupt


def _default_sigterm_in_child() -> None:
    """A forked child (a DataLoader worker, a library's helper process) dies quietly on
    SIGTERM: it must not inherit the command's handler and raise ``Terminated`` (with a
    traceback on stderr) when its parent stops it."""
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def _on_sigterm(signum, frame):
    # Ignore a second TERM so the first one's cleanup runs to the end (SLURM follows
    # up with SIGKILL after KillWait anyway).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _sigterm_seen.set()
    raise Terminated()


def _redeliver_swallowed(unraisable, chained) -> None:
    """Python drops an exception raised inside a weakref callback or ``__del__`` ("Exception
    ignored in ..."): a SIGTERM that lands there would be lost and the command run on. Raise
    it again, once the main thread is back in ordinary code; anything else goes on as before."""
    if not issubclass(unraisable.exc_type, Terminated):
        chained(unraisable)
        return
    # Not from here: a handler run inside this hook would be dropped the same way. A timer
    # thread signals again; the handler then runs in the main thread's own code.
    while True:
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)  # hooks for Terminated run in the main thread
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        except Terminated:
            # On a busy machine the timer fires before start() returns: its Terminated lands
            # here, inside the hook, where Python would drop it. Send it again.
            continue


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises ``Terminated`` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm_seen.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: _redeliver_swallowed(u, hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook


@contextlib.contextmanager
def user_errors():
    """Bad input -> one line on stderr, exit 2; a RunError -> one line, exit 1; Ctrl-C ->
    exit 130; SIGTERM -> exit 143."""
    try:
        with _sigterm_raises():
            yield
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INPUT) from None
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_RUN) from None
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated) or _sigterm_seen.is_set():
            print("terminated", file=sys.stderr)
            raise typer.Exit(EXIT_TERMINATED) from None
        print("interrupted", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except SystemExit as e:
        # ray.init installs its own SIGTERM handler in the driver: sys.exit(SIGTERM).
        if e.code == signal.SIGTERM:
            print("terminated", file=sys.stderr)
            raise typer.Exit(EXIT_TERMINATED) from None
        raise
