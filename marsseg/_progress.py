"""Progress on the terminal: the training board, the prediction bar, and score cells.

Training: one line per (member, fold), fed by train_one_fold's events.
`ProgressView.update(events)` takes the `Event` records train_one_fold reports ("start",
"batch", "epoch", "done"; Ray workers send them to the driver's board). On a terminal it
renders a rich Live table; when stdout is not a terminal (SLURM logs, CI) it prints one
plain line per event worth keeping (start, epoch end, done).

Prediction and evaluation: `progress_bar`, a rich bar with images/s on stderr.
Tables of scores: `pct`, a fraction shown x100 with two decimals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

#: the keys each kind of event carries after the common ones, in the order they are sent
EVENT_KEYS = {"start": ("epoch", "resumed_from", "n_train", "n_pseudo", "n_val", "precision",
                        "device"),
              "batch": ("epoch", "batch", "batches", "img_s"),
              "epoch": ("epoch", "loss", "val_miou", "best_miou", "img_s", "seconds"),
              "done": ("epoch", "val_miou")}


@dataclasses.dataclass(frozen=True)
class Event:
    """One progress event of a (member, fold): "start", "batch", "epoch" or "done".

    `to_json` gives the dict of the common keys and the kind's own (`EVENT_KEYS`); keys
    that are not the kind's stay None.
    """

    event: str
    member: str
    fold: int | str
    epochs: int
    pid: int
    time: float
    epoch: int = 0  # start: the first epoch to train; else the epoch reported
    resumed_from: int | None = None  # start: the saved epoch it resumed after
    n_train: int | None = None  # start: labeled training images
    n_pseudo: int | None = None  # start: pseudo-labelled test images in the training part
    n_val: int | None = None
    precision: str | None = None
    device: str | None = None
    batch: int | None = None  # batch: batches done of `batches` in this epoch
    batches: int | None = None
    img_s: float | None = None
    loss: float | None = None  # epoch: training loss
    val_miou: float | None = None  # epoch, done: validation course mIoU
    best_miou: float | None = None
    seconds: float | None = None  # epoch: its wall seconds

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("event", "member", "fold", "epochs", "pid", "time",
                                              *EVENT_KEYS[self.event])}

    @classmethod
    def from_json(cls, d: dict) -> Event:
        """From `to_json`'s dict; an unknown kind or key, or a value of the wrong type, is a
        ValueError naming the key."""
        if not isinstance(d, dict) or d.get("event") not in EVENT_KEYS:
            raise ValueError(f"not a progress event: {d!r}")
        for k, v in d.items():
            kinds = _EVENT_TYPES.get(k)
            if kinds is None:
                raise ValueError(f"progress event: unknown key {k!r}")
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise ValueError(f"progress event: {k!r} is {v!r}, expected "
                                 f"{' or '.join(t.__name__ for t in kinds)}")
        return cls(**d)


_I, _F, _S, _N = (int,), (int, float), (str,), (type(None),)
_EVENT_TYPES = {"event": _S, "member": _S, "fold": _I + _S, "epochs": _I, "pid": _I, "time": _F,
                "epoch": _I, "resumed_from": _I + _N, "n_train": _I + _N, "n_pseudo": _I + _N,
                "n_val": _I + _N,
                "precision": _S + _N, "device": _S + _N, "batch": _I + _N, "batches": _I + _N,
                "img_s": _F + _N, "loss": _F + _N, "val_miou": _F + _N, "best_miou": _F + _N,
                "seconds": _F + _N}


def _fmt_s(s: float | None) -> str:
    if s is None or s != s or s < 0:
        return "-"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def pct(v: float | None) -> str:
    """A score 0..1 as a table cell: x100 with two decimals, "-" when missing."""
    return "-" if v is None else f"{100 * v:.2f}"


class _Row:
    def __init__(self, member: str, fold: int, epochs: int, status: str):
        self.member, self.fold, self.epochs, self.status = member, fold, epochs, status
        self.epoch = -1          # last finished epoch
        self.batch = 0
        self.batches = 0
        self.loss = None
        self.val_miou = None
        self.best = None
        self.img_s = None
        self.epoch_s: list[float] = []
        self.epoch_t0 = None
        self.attempts = 0
        self.note = ""

    def eta(self) -> float | None:
        if self.status != "running" or not self.epoch_s:
            return None
        per = sum(self.epoch_s[-3:]) / len(self.epoch_s[-3:])
        left = self.epochs - self.epoch - 1
        if self.epoch_t0 is not None:
            left_s = left * per - min(time.time() - self.epoch_t0, per)
        else:
            left_s = left * per
        return max(left_s, 0.0)


class ProgressView:
    """Shows training of several (member, fold) jobs; `mode` is auto | live | plain | none."""

    def __init__(self, jobs: list[tuple[str, int, int]], *, mode: str = "auto",
                 console: Console | None = None, skipped: list[tuple[str, int]] = ()):
        self.console = console or Console()
        if mode == "auto":
            mode = "live" if self.console.is_terminal else "plain"
        self.mode = mode
        self.rows: dict[tuple[str, int], _Row] = {}
        for member, fold, epochs in jobs:
            self.rows[(member, fold)] = _Row(member, fold, epochs, "queued")
        for member, fold in skipped:
            self.rows[(member, fold)] = _Row(member, fold, 0, "done (before)")
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        if self.mode == "live":
            self._live = Live(self._table(), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(*exc)
            self._live = None

    def log(self, text: str) -> None:
        if self.mode == "none":
            return
        if self._live is not None:
            self._live.console.print(text)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def update(self, events: list[Event]) -> None:
        for ev in events:
            self._apply(ev)
        if self._live is not None:
            self._live.update(self._table())

    def fail(self, member: str, fold: int, why: str) -> None:
        row = self.rows.get((member, fold))
        if row is not None:
            row.status, row.note = "failed", why
        self.log(f"{member} fold {fold}: failed: {why}")

    def _apply(self, ev: Event) -> None:
        key = (ev.member, ev.fold)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = _Row(key[0], key[1], ev.epochs, "queued")
        row.epochs = ev.epochs
        name = f"{row.member} fold {row.fold}"
        if ev.event == "start":
            row.attempts += 1
            row.status = "running"
            row.epoch = ev.epoch - 1
            row.epoch_t0 = ev.time
            resumed = ev.resumed_from
            row.note = f"resumed after epoch {resumed}" if resumed is not None else ""
            if row.attempts > 1:
                row.note = f"attempt {row.attempts}, " + (row.note or "from scratch")
            if self.mode == "plain":
                pseudo = f" + {ev.n_pseudo} pseudo-labelled" if ev.n_pseudo else ""
                self.log(f"{name}: start ({ev.n_train} train{pseudo} / {ev.n_val} val images,"
                         f" {ev.precision} on {ev.device}, pid {ev.pid})"
                         + (f" {row.note}" if row.note else ""))
        elif ev.event == "batch":
            row.batch, row.batches = ev.batch or 0, ev.batches or 0
            row.img_s = ev.img_s if ev.img_s is not None else row.img_s
        elif ev.event == "epoch":
            row.epoch = ev.epoch
            row.loss, row.val_miou = ev.loss, ev.val_miou
            row.best, row.img_s = ev.best_miou, ev.img_s
            row.epoch_s.append(ev.seconds or 0.0)
            row.epoch_t0 = ev.time
            row.batch = 0
            if self.mode == "plain":
                self.log(f"{name}: epoch {row.epoch + 1}/{row.epochs} loss {row.loss:.4f} "
                         f"val mIoU {pct(row.val_miou)} (best {pct(row.best)}) "
                         f"{row.img_s:.0f} img/s ETA {_fmt_s(row.eta())}")
        elif ev.event == "done":
            row.status = "done"
            if self.mode == "plain":
                self.log(f"{name}: done, best val mIoU {pct(ev.val_miou)}")

    def _table(self) -> Table:
        t = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("member", "fold", "status", "epoch", "loss", "val mIoU", "best", "img/s", "ETA"):
            t.add_column(col, justify="left" if col in ("member", "status") else "right")
        for (member, fold), r in sorted(self.rows.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            if r.status == "running" and r.batches:
                ep = f"{r.epoch + 2}/{r.epochs} ({r.batch}/{r.batches})"
            elif r.epochs:
                ep = f"{r.epoch + 1}/{r.epochs}"
            else:
                ep = "-"
            status = r.status + (f" ({r.note})" if r.note else "")
            t.add_row(member, str(fold), status, ep,
                      "-" if r.loss is None else f"{r.loss:.4f}", pct(r.val_miou), pct(r.best),
                      "-" if r.img_s is None else f"{r.img_s:.0f}", _fmt_s(r.eta()))
        return t


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True):
    """A rich progress bar with images/s on stderr; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "- img/s", style="progress.data.speed")

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  Rate(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        try:
            yield lambda n: bar.advance(task, n)
        except BaseException:
            # On failure the error line stands alone: clear the bar, skip rich's blank line.
            bar.live.transient = True
            bar.live.stop()
            bar.disable = True
            raise


class Report:
    """Progress events of one fold: "start", "epoch", "done" as they come, "batch" every 2 s."""

    def __init__(self, progress: Callable[[Event], None] | None, member, fold: int):
        self.progress, self.member, self.fold = progress, member, fold
        self.last_batch = time.perf_counter()

    def __call__(self, event: str, **kw) -> None:
        if self.progress is not None:
            self.progress(Event(event, self.member.name, self.fold, self.member.epochs,
                                os.getpid(), time.time(), **kw))

    def batch(self, epoch: int, batch: int, batches: int, n_img: int, t_epoch: float) -> None:
        if self.progress is not None and time.perf_counter() - self.last_batch > 2.0:
            self.last_batch = time.perf_counter()
            self("batch", epoch=epoch, batch=batch, batches=batches,
                 img_s=n_img / (self.last_batch - t_epoch))
