"""Where and in what precision networks run: the one authority on device and precision.

One rule for training and prediction. ``auto`` means bf16 autocast on a CUDA GPU
that supports it (else fp16), and on a CPU only when it has native bf16 matmul
(AVX512-BF16 / AMX); other CPUs run fp32 ("no"): there bf16 is emulated, slower
than fp32 and less exact, so it buys nothing. fp16 is GPU-only (CPU autocast
supports bf16 only).

A command turns its options into one frozen `Resolved` at its entry point
(`resolve`) and hands it down: nothing below decides the device or precision again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from .errors import InputError

#: the --precision values: auto (the rule above), bf16, fp16 (GPU only), no (fp32)
PRECISIONS = ("auto", "bf16", "fp16", "no")


@dataclass(frozen=True)
class Resolved:
    """How a command runs its networks, decided once: device, precision (bf16 | fp16 |
    no), backend (``backends.BACKENDS`` minus auto; training: eager) and torch threads
    (None: torch's default)."""

    device: torch.device
    precision: str
    backend: str = "eager"
    threads: int | None = None

    def autocast(self):
        """The autocast context of this precision on this device."""
        return autocast(self.device, self.precision)

    def with_backend(self, backend: str) -> Resolved:
        return dataclasses.replace(self, backend=backend)

    def with_threads(self, threads: int | None) -> Resolved:
        return dataclasses.replace(self, threads=threads)


def check_precision_name(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"--precision: unknown value {precision!r} (valid: {', '.join(PRECISIONS)})")
    return precision


def check_device(device: str | None) -> torch.device | None:
    """Parse ``--device`` and check that this torch can use it (InputError naming the value)."""
    if not device:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: not a torch device "
                         "(e.g. cpu, cuda, cuda:1, mps)") from None
    if d.type == "cpu":
        if d.index not in (None, 0):  # torch accepts cpu:7 and runs on the one CPU device
            raise InputError(f"--device {device}: there is one cpu device; use --device cpu")
        return d
    backend = getattr(torch, d.type, None)  # torch.cuda, torch.mps, torch.xpu ...
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        raise InputError(f"--device {device}: this torch ({torch.__version__}) has no usable "
                         f"{d.type} device; use --device cpu or leave --device out")
    count = getattr(backend, "device_count", None)
    if d.index is not None and callable(count) and d.index >= count():
        raise InputError(f"--device {device}: only {count()} {d.type} device(s) visible")
    return d


def resolve_device(device: str | None = None) -> torch.device:
    """The device to run on: the given one, else CUDA when available, else CPU."""
    if device:
        return check_device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16_fast() -> bool:
    """True when the CPU has native bf16 matmul support (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def cuda_bf16() -> bool:
    """True when the current CUDA GPU supports bf16."""
    return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to bf16 | fp16 | no for ``device`` (module docstring); fp16 off CUDA and
    unknown values are InputErrors."""
    check_precision_name(precision)
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 is GPU-only (CPU autocast supports bf16); "
                         "use --precision bf16 or no")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_bf16() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_bf16_fast() else "no"


def resolve(device: str | torch.device | None, precision: str,
            threads: int | None = None) -> Resolved:
    """The one resolution of a command's ``--device`` and ``--precision`` (backend eager)."""
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    return Resolved(device, resolve_precision(precision, device), threads=threads)


def resolve_training(precision: str, gpus: float | None) -> Resolved:
    """The one resolution of train-folds' ``--precision`` for its fold tasks.

    ``gpus``: GPUs each Ray task gets (a task with a GPU trains on CUDA, one without on
    the CPU: Ray hides the GPUs from it); None: the folds run in this process, on CUDA
    when this machine has it. ``auto`` on a task GPU the driver cannot see (a cluster)
    is fp16, which every CUDA GPU runs.
    """
    check_precision_name(precision)
    if gpus is None:
        return resolve(None, precision)
    if gpus <= 0:
        if precision == "fp16":
            raise InputError("--precision fp16 is GPU-only (CPU autocast supports bf16); "
                             "use --precision bf16 or no, or request GPUs with --gpus-per-task")
        return resolve("cpu", precision)
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and cuda_bf16() else "fp16"
    return Resolved(torch.device("cuda"), precision)


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (bf16 | fp16 | no) on ``device``."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_accelerator(precision: str, cpu: bool, log_with=None, project_dir=None,
                     split_batches: bool = False):
    """A fold's Accelerator, which owns its device and precision; with `log_with` (accelerate
    trackers, `tracking`) its project_dir is the run folder. split_batches (a data-parallel
    fold, `dataparallel`): each loader batch is the global batch, every process takes 1/N."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, PartialState

    # One process may train several folds (--sequential, tests); accelerate keeps a
    # process-wide singleton that refuses a second Accelerator with other settings.
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    extra = {"log_with": log_with, "project_dir": str(project_dir)} if log_with else {}
    if split_batches:
        extra["dataloader_config"] = DataLoaderConfiguration(split_batches=True)
    return Accelerator(mixed_precision=precision, cpu=cpu, **extra)
