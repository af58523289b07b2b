"""--time-budget: a per-fold wall-clock budget turned into an epoch count, decided once per fold.

The count comes from a short timing probe that runs *before* epoch 0 on the fold's
own model, optimizer and accelerator (so precision, threads, channels_last and an
opt-in torch.compile are all in the measurement), after which the model, optimizer
and grad-scaler states are put back exactly as they were. Why a probe and not "time
epoch 0, then decide": the cosine schedule (and the step-based warmup) needs the
epoch count from the first optimizer step. Without warmup, epoch 0's learning rates
depend on the count, so deciding after epoch 0 would train it under a guessed
schedule that a restart with the recorded count would not retrace. The probe costs
a few training steps (seconds) and leaves the fold bit-identical to one trained with
`--epochs <decided count>`.

The decision is written to ``fold_<k>/budget.json`` before epoch 0 starts; a resumed
or re-run fold reads it back and never measures again, so its schedule is the same.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ._io import read_json, write_json_atomic
from .errors import InputError
from .runfolder import BUDGET

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*$")

# Probe sizes: the first steps pay one-off costs (oneDNN kernel selection, torch.compile,
# allocator growth) and are not timed; the median of the timed ones ignores a hiccup.
WARM_STEPS, TIMED_STEPS = 2, 8
WARM_VAL, TIMED_VAL = 1, 3


def parse_duration(text: str, what: str = "--time-budget") -> float:
    """'90s' | '12m' | '1.5h' -> seconds (> 0). A unit is required: a bare number is ambiguous."""
    match = _DURATION.match(str(text))
    seconds = float(match[1]) * _UNITS[match[2]] if match else 0.0
    if not match or seconds <= 0:
        raise InputError(f"{what}: expected a positive duration with a unit s, m or h "
                         f"(e.g. 90s, 12m, 1.5h), got {text!r}")
    return seconds


def epochs_for_budget(budget_s: float, *, probe_s: float, train_step_s: float,
                      steps_per_epoch: int, val_s: float, checkpoint_s: float) -> int:
    """Whole epochs that fit in `budget_s` after the probe; at least 1.

    One epoch = its training steps + one validation pass + one checkpoint (state and,
    when the epoch is best so far, the weights). Seconds throughout.
    """
    epoch_s = steps_per_epoch * train_step_s + val_s + checkpoint_s
    if epoch_s <= 0:
        return 1
    return max(1, math.floor((budget_s - probe_s) / epoch_s))


def fit_member(member, epochs: int):
    """`member` with the decided epoch count; a warmup as long as the run is shortened to
    epochs - 1, so the schedule still decays to its low end by the last epoch."""
    schedule = member.schedule
    if schedule.warmup_epochs >= epochs:
        schedule = dataclasses.replace(schedule, warmup_epochs=epochs - 1)
    return dataclasses.replace(member, epochs=epochs, schedule=schedule)


def _median_seconds(fn: Callable[[], None], warm: int, timed: int, sync: Callable[[], None]) -> float:
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def probe(model: torch.nn.Module, optimizer, accelerator, *, train_step: Callable[[], None],
          val_step: Callable[[], None], n_val_batches: float, scratch: Path) -> dict:
    """Time training steps, validation batches and one checkpoint; restore every state after.

    train_step / val_step run one batch (the caller's own code path). n_val_batches:
    validation pass length in `val_step` batches. Returns seconds per piece.
    """
    t0 = time.perf_counter()
    scaler = getattr(accelerator, "scaler", None)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(),
                           scaler.state_dict() if scaler is not None else None))
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    try:
        train_step_s = _median_seconds(train_step, WARM_STEPS, TIMED_STEPS, sync)
        val_batch_s = _median_seconds(val_step, WARM_VAL, TIMED_VAL, sync)
        shutil.rmtree(scratch, ignore_errors=True)
        t_ck = time.perf_counter()
        accelerator.save_state(str(scratch))  # optimizer moments are filled: real size
        checkpoint_s = time.perf_counter() - t_ck
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.load_state_dict(saved[2])
        model.train()
    return {"train_step_s": train_step_s, "val_s": val_batch_s * n_val_batches,
            "checkpoint_s": checkpoint_s, "probe_s": time.perf_counter() - t0}


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def decide_epochs(fold_dir: Path, budget_s: float | None, *, has_state: bool,
                  measure: Callable[[], dict], steps_per_epoch: int) -> int | None:
    """The fold's epoch count under `budget_s`: read from budget.json, or measured and recorded.

    None when the fold runs without a budget (and none was ever recorded for it).
    """
    path = Path(fold_dir) / BUDGET
    record = read_json(path, "budget record", f"delete {fold_dir} to train this fold again")
    if record is not None:
        if (not isinstance(record, dict) or not _positive_number(record.get("time_budget_s"))
                or not isinstance(record.get("epochs"), int) or record["epochs"] < 1):
            raise InputError(f"{path}: needs a number \"time_budget_s\" > 0 and an integer "
                             f"\"epochs\" >= 1; delete {fold_dir} to train this fold again")
        if budget_s is None or not math.isclose(record["time_budget_s"], budget_s):
            was = f"{record['time_budget_s']:g}s"
            raise InputError(f"{path}: this fold's epochs were set by --time-budget {was}; "
                             f"run it with the same budget or use a new --out")
        return int(record["epochs"])
    if budget_s is None:
        return None
    if has_state:
        raise InputError(f"{fold_dir}: this fold was started without --time-budget; "
                         f"resume it without one or use a new --out")
    est = measure()
    epochs = epochs_for_budget(budget_s, steps_per_epoch=steps_per_epoch, **est)
    rounded = {k: round(v, 4) for k, v in est.items()}
    write_json_atomic(path, {"time_budget_s": budget_s, "epochs": epochs,
                             "steps_per_epoch": steps_per_epoch, "measured": rounded})
    return epochs


def fold_epochs(fold_dir: Path, budget_s: float | None, *, has_state: bool, model, optimizer,
                accelerator, train_step: Callable, val_forward: Callable,
                train_batch: tuple, val_batch, n_val: int, steps_per_epoch: int) -> int | None:
    """`decide_epochs` for a fold, measured (when it must be) by `probe` on the fold's own code.

    train_step(images, masks, lr): one optimizer step of the loop; val_forward(images): the
    validation forward. train_batch: (images, masks) uint8 (B,H,W), val_batch: images uint8,
    one batch each; n_val: validation images. The step runs at the optimizer's current lr.
    """
    def measure() -> dict:
        dev = accelerator.device
        x, y = (torch.from_numpy(a).to(dev) for a in train_batch)
        xv = torch.from_numpy(val_batch).to(dev)
        lr = optimizer.param_groups[0]["lr"]

        def val_step() -> None:
            model.eval()
            with torch.no_grad():
                val_forward(xv)

        return probe(model, optimizer, accelerator, train_step=lambda: train_step(x, y, lr),
                     val_step=val_step, n_val_batches=n_val / max(1, len(xv)),
                     scratch=Path(fold_dir) / "budget-probe.tmp")

    return decide_epochs(fold_dir, budget_s, has_state=has_state, measure=measure,
                         steps_per_epoch=steps_per_epoch)
