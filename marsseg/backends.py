"""Inference backends for the predictor: eager PyTorch, AOT-compiled PyTorch, OpenVINO.

- ``eager``: the fold modules as they are (channels_last, autocast from the predictor).
- ``compile``: ``torch.export`` + AOTInductor with ``freezing`` (weights folded in as
  constants, BN folded into convs) and ``max_autotune``; bf16 autocast is traced into
  the graph, so the package runs at the predictor's precision by itself.
- ``openvino``: the fold converted to OpenVINO IR, run by its CPU plugin with the
  bf16 inference hint when the predictor's precision is bf16 (f32 otherwise) and
  as many threads as torch uses.
- ``openvino-int8``: the same IR after NNCF post-training int8 quantization,
  calibrated on 256 training images spread over the train split.
- ``auto``: eager on a GPU; on a CPU openvino when it is installed, else eager (see
  ``resolve``).

Every converted network has ONE static input shape, (batch x views, 1, H, W), where
batch is ``static_batch``: the batch size, or for fewer images the next power of two
at or above their count (a few cached sizes; 8 images never build a network for
5,000). A shorter batch is padded with zero images and the padding rows dropped (rows never
mix: BN runs in eval mode and the input norm is per image), a longer one is run in
chunks, so nothing recompiles. Conversions cost seconds to minutes, so they are
paid once per fold folder: ``<fold>/cache/<backend>-<precision>-<sha16>-b<n>.<ext>``
keyed by the weights' sha256, written under a temp name and renamed, reused by
the next run and pruned when the weights change.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import cache as C
from ._io import no_space, sha256_file
from .errors import InputError
from .quantize import calibration
from .runfolder import WEIGHTS, cache_key

BACKENDS = ("auto", "eager", "compile", "openvino", "openvino-int8")
#: optional package of each backend that needs one, and the extra that installs it
NEEDS = {"openvino": ("openvino",), "openvino-int8": ("openvino", "nncf")}

Log = Callable[[str], None] | None


def stderr_line(text: str) -> None:
    """One progress line on stderr (above a live rich progress bar, which redirects it)."""
    print(text, file=sys.stderr, flush=True)


def check_name(name: str) -> str:
    if name not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def available(name: str) -> bool:
    """True when the optional packages of backend ``name`` import."""
    try:
        _require(name)
    except InputError:
        return False
    return True


def _require(name: str) -> None:
    for pkg in NEEDS.get(name, ()):
        try:
            __import__(pkg)
        except ImportError:
            raise InputError(f"backend {name} needs the Python package '{pkg}', which is not "
                             "installed: pip install 'marsseg[openvino]'") from None


def resolve(name: str, device: torch.device, compile_flag: bool = False,
            precision: str = "bf16") -> str:
    """The concrete backend for ``name`` on ``device``; checks its packages are installed.

    ``auto``: eager on a GPU (its kernels are already fast; nothing to convert) and for
    fp32 (``precision`` "no": OpenVINO fp32 was slower than eager bf16); on a CPU in bf16
    openvino when installed (faster than eager bf16 and within the accuracy budget; the
    figures are in README and bench/results). int8 and compile drift further from fp32
    and stay opt-in.
    ``compile_flag`` is the older ``--compile`` switch: it means ``compile``.
    """
    name = check_name(name)
    if compile_flag and name in ("eager", "auto"):
        name = "compile"
    if name == "auto":
        cpu_bf16 = device.type == "cpu" and precision == "bf16"
        name = "openvino" if cpu_bf16 and available("openvino") else "eager"
    if name.startswith("openvino") and device.type != "cpu":
        raise InputError(f"backend {name} runs on the CPU only (device is {device}); "
                         "use --device cpu or --backend eager")
    _require(name)
    return name


# --------------------------------------------------------------------------- static shape


def static_batch(batch_size: int, n_images: int | None = None) -> int:
    """The one batch a converted network is built for: ``batch_size``, or, when only
    ``n_images`` (< batch_size) will be predicted, the next power of two at or above it."""
    if n_images is None or n_images >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(n_images - 1, 0).bit_length())


class StaticRunner:
    """Runs a converted network at its one static batch ``n``: shorter inputs are padded
    with zero images (their rows dropped again), longer ones run in chunks of ``n``.

    Shape: x float (b, 1, H, W) -> logits float32 (b, C, H, W), like the module.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], n: int, name: str):
        self.fn, self.n, self.name = fn, n, name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for s in range(0, x.shape[0], self.n):
            c = x[s:s + self.n].float()
            k = c.shape[0]
            if k < self.n:
                c = torch.cat([c, c.new_zeros((self.n - k, *c.shape[1:]))])
            outs.append(self.fn(c.contiguous())[:k])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class _Traceable(nn.Module):
    """The fold network with the precision traced in: autocast inside, float32 logits out."""

    def __init__(self, model: nn.Module, device_type: str, precision: str):
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device_type, dtype=self.dtype) if self.dtype
               else contextlib.nullcontext())
        with ctx:
            out = self.model(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float()


# --------------------------------------------------------------------------- cache


def cache_path(fold_dir: Path, backend: str, precision: str, sha: str, n: int) -> Path:
    """Where the converted fold lives (without extension; `runfolder.cache_key`): a compiled
    program depends on torch's version too."""
    return cache_key(fold_dir, backend, precision, sha, n,
                     torch.__version__ if backend == "compile" else None)


def _fold_sha(fm) -> str:
    """The recorded sha256 (checked by load_ensemble in the driver); hashed only without one."""
    return fm.sha256 or sha256_file(Path(fm.path) / WEIGHTS)


def converted(folds, backend: str, *, precision: str, n: int) -> bool:
    """True when every fold's conversion for this backend, precision and static batch
    ``n`` is already cached in its fold folder with its manifest (nothing to convert,
    nothing to write; the files are hashed when they are loaded)."""
    return backend == "eager" or all(
        _is_cached(backend, cache_path(fm.path, backend, precision, _fold_sha(fm), n),
                   precision, n, _fold_sha(fm))
        for fm in folds)


_SCRATCH = None  # conversions of read-only run folders live here for the process


def _scratch():
    global _SCRATCH
    if _SCRATCH is None:
        import tempfile

        _SCRATCH = tempfile.TemporaryDirectory(prefix="marsseg-backend-")
    return _SCRATCH


def _tmp(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}{suffix}")


# --------------------------------------------------------------------------- compile (AOTInductor)


def _compile_fold(model: nn.Module, example: torch.Tensor, precision: str, out: Path) -> None:
    """torch.export + AOTInductor package at ``out`` (.pt2), written atomically."""
    wrapped = _Traceable(model, example.device.type, precision).eval()
    tmp = _tmp(out.with_suffix(""), ".pt2")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, not ours
        ep = torch.export.export(wrapped, (example,))
        try:
            for configs in ({"freezing": True, "max_autotune": True}, {"freezing": True}):
                try:
                    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                             inductor_configs=configs)
                    break
                except Exception:  # max-autotune does not run everywhere; freezing alone pays
                    if "max_autotune" not in configs:
                        raise
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)


def _load_compiled(package: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load a verified .pt2 from its bytes: they go to a private folder first, so what
    torch loads (a native library) is exactly what was hashed, and the folder (with what
    the loader unpacked into it) is removed whether the load works or fails."""
    import shutil
    import tempfile
    from unittest import mock

    folder = tempfile.mkdtemp(prefix="marsseg-pt2-")  # mode 0700
    try:
        path = Path(folder) / "model.pt2"
        path.write_bytes(package)
        # the loader unpacks into $TMPDIR/aotinductor_* and leaves it there when it fails
        with mock.patch.dict(os.environ, {"TMPDIR": folder}):
            return torch._inductor.aoti_load_package(str(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- OpenVINO


_CORE = None


def _core():
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def _convert_ov(model: nn.Module, example: torch.Tensor, calib: list[np.ndarray] | None,
                out: Path) -> None:
    """OpenVINO IR (fp32 weights) at ``out``.xml/.bin, int8-quantized when ``calib`` is
    given; .bin renamed first, .xml last (an .xml means a whole pair)."""
    import openvino as ov

    wrapped = _Traceable(model, "cpu", "no").eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from the input checks
        ovm = ov.convert_model(wrapped, example_input=example, input=[tuple(example.shape)])
    if calib is not None:
        import logging

        import nncf

        nncf.set_log_level(logging.ERROR)
        # nncf draws its own progress bar on stdout, which would cut through ours
        with contextlib.redirect_stdout(io.StringIO()):
            ovm = nncf.quantize(ovm, nncf.Dataset(calib), subset_size=len(calib))
    xml, binf = out.with_suffix(".xml"), out.with_suffix(".bin")
    tmp_xml, tmp_bin = _tmp(out, ".xml"), _tmp(out, ".bin")
    try:
        ov.save_model(ovm, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_bin, binf)
        os.replace(tmp_xml, xml)
    finally:
        tmp_xml.unlink(missing_ok=True)
        tmp_bin.unlink(missing_ok=True)


def _load_ov(xml: bytes, weights: bytes, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load a verified IR pair from its bytes (what was hashed is what runs)."""
    core = _core()
    cfg = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
           "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    model = core.read_model(xml, weights)
    compiled = core.compile_model(model, "CPU", cfg)
    request = compiled.create_infer_request()

    def run(c: torch.Tensor) -> torch.Tensor:
        res = request.infer({0: c.numpy()})
        return torch.from_numpy(np.array(res[compiled.output(0)], copy=True))

    return run


# --------------------------------------------------------------------------- entry point


def _tag(precision: str) -> str:
    return "f32" if precision == "no" else precision


def _is_cached(backend: str, path: Path, precision: str, n: int, sha: str) -> bool:
    return C.expected(path, backend=backend, precision=_tag(precision), batch=n,
                      weights_sha256=sha)[0] is not None


def _load_verified(backend: str, path: Path, precision: str, n: int, sha: str):
    """(the loaded conversion, "") when its manifest describes it and every file's sha256
    matches (the bytes hashed are the bytes loaded), else (None, why not)."""
    files, why = C.expected(path, backend=backend, precision=_tag(precision), batch=n,
                            weights_sha256=sha)
    if files is None:
        return None, why
    blobs = {}
    for name, digest in files.items():
        blobs[Path(name).suffix] = C.read_verified(path.parent / name, digest)
        if blobs[Path(name).suffix] is None:
            return None, f"{name} differs from its manifest"
    try:
        if backend == "compile":
            return _load_compiled(blobs[".pt2"]), ""
        return _load_ov(blobs[".xml"], blobs[".bin"], "bf16" if precision == "bf16" else "no"), ""
    except Exception as e:  # noqa: BLE001 - any failure: convert again
        return None, f"cannot load it ({type(e).__name__})"


def _disk_full(folder: Path, fold_dir: Path) -> bool:
    """The converters' C++ streams report a full disk as "basic_ios::clear": ask the disk."""
    import shutil

    try:
        free = shutil.disk_usage(folder if folder.exists() else fold_dir).free
        return free < 2 * (Path(fold_dir) / WEIGHTS).stat().st_size + (1 << 20)
    except OSError:
        return False


def _convert_cached(backend, module, example, precision, path: Path, n: int, sha: str,
                    calib, fold_dir: Path) -> float:
    """Convert into `path`, record the manifest, prune older conversions; seconds spent.
    A failure leaves no file of this conversion behind."""
    t0 = time.perf_counter()
    C.remove(path)
    try:
        _convert(backend, module, example, precision, path, calib)
        C.write_manifest(path, _files(backend, path), backend=backend, precision=_tag(precision),
                         batch=n, weights_sha256=sha)
    except InputError:
        C.remove(path)
        raise
    except Exception as e:  # no C++ compiler, unsupported op, a full disk ...: one line
        C.remove(path)
        if no_space(e) or _disk_full(path.parent, fold_dir):  # C++: "basic_ios::clear"
            raise InputError(f"{path.parent}: cannot write the {backend} conversion (no space "
                             "left on device)") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{fold_dir}: {backend} conversion failed "
                         f"({type(e).__name__}: {msg[:200]})") from None
    C.prune(path.parent, backend, sha)
    return time.perf_counter() - t0


def _files(backend: str, path: Path) -> list[Path]:
    if backend == "compile":
        return [path.with_suffix(".pt2")]
    return [path.with_suffix(".xml"), path.with_suffix(".bin")]


def _convert(backend: str, model: nn.Module, example: torch.Tensor, precision: str,
             path: Path, calib: Callable[[], list[np.ndarray]]) -> None:
    if backend == "compile":
        _compile_fold(model, example, precision, path.with_suffix(".pt2"))
    else:
        _convert_ov(model, example, calib() if backend == "openvino-int8" else None, path)


def prepare(folds, backend: str, *, device: torch.device, precision: str, batch_size: int,
            views: Sequence[tuple[int, ...]], channels_last: bool = True, log: Log = None,
            calib_data: str | os.PathLike | None = None, n_images: int | None = None) -> list:
    """The callables the predictor runs, one per fold, in order: ``x -> logits``.

    ``folds``: the ensemble's ``FoldModel``s (module + folder). Eager returns the
    modules on ``device``; other backends load the fold's cached conversion or
    convert it (``log`` gets one line per conversion, with its seconds); ``n_images``,
    when known, caps the static batch (``static_batch``).
    Shape: each callable maps float (b, 1, H, W) to logits (b, C, H, W).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    modules = [fm.model.eval().to(device, memory_format=fmt) for fm in folds]
    if backend == "eager":
        return modules
    from . import IMAGE_SHAPE

    batch_size = static_batch(batch_size, n_images)
    n = batch_size * len(views)
    example = torch.zeros((n, 1, *IMAGE_SHAPE), device=device)
    batches: list[np.ndarray] = []

    def calib() -> list[np.ndarray]:
        if not batches:
            if calib_data is None:
                raise InputError(f"backend {backend} needs training images to calibrate on")
            batches.extend(calibration(calib_data, batch_size, views, n, log or stderr_line))
        return batches

    runners = []
    for fm, module in zip(folds, modules, strict=True):
        sha = _fold_sha(fm)
        path = cache_path(fm.path, backend, precision, sha, n)
        made = not path.parent.exists()
        if not C.usable_dir(path.parent):  # read-only, or a link: convert into a temp folder
            path, made = Path(_scratch().name) / path.name, False
        fn, why = _load_verified(backend, path, precision, n, sha)
        if fn is None:
            try:
                s = _convert_cached(backend, module, example, precision, path, n, sha, calib,
                                    fm.path)
            except BaseException:
                if made:  # no empty cache/ left behind
                    with contextlib.suppress(OSError):
                        path.parent.rmdir()
                raise
            fn, why2 = _load_verified(backend, path, precision, n, sha)
            if fn is None:
                raise InputError(f"{path.parent}: the {backend} conversion just written does "
                                 f"not load ({why2})")
            if log:
                redo = "" if why == "not cached" else f"; the cached one did not verify: {why}"
                log(f"converting {fm.name} ({backend}) ... {s:.1f} s (cached in "
                    f"{path.parent}{redo})")
        runners.append(StaticRunner(fn, n, fm.name))
    return runners
