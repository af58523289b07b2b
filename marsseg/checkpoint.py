"""What a fold carries from epoch to epoch and saves after each one, and resuming from it.

`TrainerState` is the loop's own state (saved as ``state/trainer.json``); `save_state`
writes it with accelerate's state (model, optimizer, RNGs) into a temp folder swapped in
as ``state/``; `resume` restores both and cuts the metrics back to the saved epoch;
`check_state` tells before training starts whether a saved state can resume. This module
reads and writes a fold's ``state/`` folder; the file names belong to `runfolder`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ._io import atomic_path
from .errors import InputError
from .runfolder import METRICS, STATE, TRAINER_STATE, WEIGHTS, truncate_metrics


@dataclasses.dataclass
class TrainerState:
    """What the loop carries from epoch to epoch; saved as state/trainer.json after each epoch."""

    epoch: int = -1  # last finished epoch
    best_miou: float | None = None  # best validation course mIoU so far (-1.0 stands for NaN)
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one (early stopping: member.patience)
    plateau_bad: int = 0  # the same, restarted when the plateau schedule decays
    plateau_scale: float = 1.0  # the plateau schedule's learning-rate factor
    step: int = 0  # optimizer steps so far: the schedule's clock
    train_seconds: float = 0.0  # training-phase seconds over every attempt
    stopped_early: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainerState:
        """From a trainer.json dict. Keys it lacks keep their defaults and unknown keys are
        ignored, so older files still resume; a value of the wrong type is a ValueError."""
        kinds = {int: (int,), float: (int, float), bool: (bool,)}
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v, kind = d[f.name], type(f.default) if f.default is not None else float
            ok = isinstance(v, kinds[kind]) and (kind is bool or not isinstance(v, bool))
            if not (ok or (f.default is None and v is None)):
                raise ValueError(f"{f.name!r} is {v!r}, expected {kind.__name__}")
            values[f.name] = kind(v) if v is not None else None
        return cls(**values)


def _load_state_file(p: Path) -> None:
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            f.keys()
    else:
        import torch

        # accelerate's own training state, loaded the way accelerate's load_state loads it
        torch.load(p, map_location="cpu", weights_only=False)


def _state_candidates(fold_dir: Path) -> list[Path]:
    # state/, then a state folder moved aside by an interrupted swap (atomic_path's .old-<pid>)
    return [fold_dir / STATE, *sorted(fold_dir.glob(f"{STATE}.old*"))]


def find_state(fold_dir: Path) -> Path | None:
    """The last complete saved state of a fold (``state/``, put back from ``state.old-*`` if
    a swap was interrupted); half-written ``state.tmp-*`` folders are removed."""
    for p in fold_dir.glob(f"{STATE}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in _state_candidates(fold_dir):
        if (p / TRAINER_STATE).is_file():
            if p.name != STATE:
                shutil.rmtree(fold_dir / STATE, ignore_errors=True)
                os.replace(p, fold_dir / STATE)
            return fold_dir / STATE
    return None


def read_trainer(state: Path) -> dict:
    path = state / TRAINER_STATE
    try:
        t = json.loads(path.read_text())
        if not isinstance(t, dict) or not isinstance(t.get("epoch"), int):
            raise ValueError("no integer 'epoch'")
        return t
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unreadable saved training state ({e}); delete {state} to "
                         f"train the fold from epoch 0") from None


def write_trainer(state: Path, trainer: dict) -> None:
    (state / TRAINER_STATE).write_text(json.dumps(trainer, indent=2) + "\n")


def check_state(fold_dir: Path, name: str) -> None:
    """An unfinished fold's saved state must load; its best weights must be there
    (`name`: the fold's display name, ``member/fold_k``)."""
    d = Path(fold_dir)
    state = next((p for p in _state_candidates(d) if (p / TRAINER_STATE).is_file()), None)
    if state is None:
        return
    hint = f"delete {state} to train {name} from epoch 0"
    trainer = read_trainer(state)
    best = trainer.get("best_epoch", -1)
    if (not isinstance(best, int) or best >= 0) and not (d / WEIGHTS).is_file():
        raise InputError(f"{d / WEIGHTS}: missing, but {state} needs it to resume; {hint}")
    for p in sorted(state.iterdir()):
        if p.suffix in (".bin", ".pkl", ".safetensors"):
            try:
                _load_state_file(p)
            except Exception as e:  # noqa: BLE001 - any failure means "cannot resume"
                raise InputError(f"{p}: unreadable saved training state "
                                 f"({type(e).__name__}); {hint}") from None


def save_state(accelerator, fold_dir: Path, trainer: dict) -> None:
    """accelerate.save_state + trainer.json into a temp folder, then swapped in as state/."""
    with atomic_path(fold_dir / STATE) as tmp:
        accelerator.save_state(str(tmp))
        write_trainer(tmp, trainer)


def load_state(accelerator, state: Path) -> None:
    """Restore accelerate's state (model, optimizer, RNGs) from `state`."""
    try:
        accelerator.load_state(str(state))
    except Exception as e:  # noqa: BLE001 - a corrupt state must not surface as a traceback
        raise InputError(f"{state}: cannot resume from the saved training state "
                         f"({type(e).__name__}); delete it to train the fold from epoch 0") from None


def resume(fold_dir: Path, accelerator) -> TrainerState | None:
    """The saved state (accelerate's restored too, metrics cut back to it), or None: a new fold."""
    metrics = fold_dir / METRICS
    main = accelerator.is_main_process  # every rank loads the state; rank 0 alone writes
    state_dir = find_state(fold_dir)
    if state_dir is None:
        if main:
            metrics.unlink(missing_ok=True)  # metrics from a run that never saved a state
        return None
    try:
        saved = read_trainer(state_dir)
        state = TrainerState.from_json(saved)
    except ValueError as e:
        raise InputError(f"{state_dir / TRAINER_STATE}: unreadable saved training state ({e}); "
                         f"delete {state_dir} to train the fold from epoch 0") from None
    check_workers(state_dir, saved, accelerator.num_processes)
    load_state(accelerator, state_dir)
    if main:
        truncate_metrics(metrics, state.epoch)
    return state


def check_workers(state_dir: Path, trainer: dict, workers: int) -> None:
    """A state saved by N data-parallel workers (its trainer.json says N; none: 1) resumes only
    with N: the saved model carries DDP's parameter names."""
    was = trainer.get("workers", 1)
    if was != workers:
        raise InputError(f"{state_dir}: saved by {was} worker(s) per fold; resume it with "
                         f"--workers-per-fold {was} (now {workers}) or delete it to restart "
                         f"the fold")
