"""Memory: peak RSS of prepare, inspect and predict against the size of an npz input.

Each command runs as `marsseg-cli` in a fresh subprocess; its own peak RSS comes from
``os.wait4`` (the child's ``ru_maxrss``), so nothing of this process is counted. The
inputs are ``savez_compressed``-style files of zeros (a few MB on disk, N x 2 x 64 x 128
bytes inside), written member by member so that this process never holds them either.
predict reads an npz whose ``training_set`` has N images and whose ``test_set`` has 8:
its memory must not depend on the training images it does not use.

Rows: for each N, the uncompressed size, the prepare output's largest shard, and the
peak RSS (MB) of each command. Flat memory means the RSS column does not grow with N.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = (2_000, 20_000, 200_000)
SIZES_QUICK = (2_000, 20_000)
TEST_IMAGES = 8


def write_zeros_npz(path: Path, n_train: int, n_test: int, block: int = 1024) -> Path:
    """A deflated npz of zeros in the course layout, written member by member in blocks of
    ``block`` rows (memory stays a few MB whatever ``n_train``)."""
    from numpy.lib import format as npf

    members = {"training_set": (n_train, 2, 64, 128), "test_set": (n_test, 64, 128)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, shape in members.items():
            row = int(np.prod(shape[1:]))
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                npf.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False,
                                               "shape": shape})
                zeros = bytes(row * min(block, shape[0]))
                for s in range(0, shape[0], block):
                    f.write(zeros[: row * min(block, shape[0] - s)])
    return path


# The child's ru_maxrss starts from the memory of the process it was forked from (Linux
# keeps the pre-exec address space's high-water mark), so a big parent (pytest after
# hundreds of tests) would be counted. A small Python in between forks the command itself
# and reports that grandchild's own peak.
_MEASURE = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def peak_rss_mb(argv: list[str]) -> float:
    """Run ``argv`` to its end; its own peak resident memory in MB (``ru_maxrss``), measured
    through a small intermediate process. A failed command raises CalledProcessError with
    its stderr."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "maxrss"
        p = subprocess.run([sys.executable, "-c", _MEASURE, str(out), *argv],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, argv, stderr=p.stderr.decode())
        return int(out.read_text()) / 1024  # KiB on Linux


def cli() -> list[str]:
    return [sys.executable, "-m", "marsseg.cli"]


def tiny_run(folder: Path) -> Path:
    """A one-member, one-fold run folder of small U-Nets (random weights) to predict with."""
    from bench.bench_predict import _make_run

    return _make_run(folder, 1, {"base_width": 4, "depth": 2})


def measure(n: int, d: Path, run: Path) -> dict:
    """Peak RSS (MB) of prepare, inspect and predict on an npz of ``n`` training images."""
    npz = write_zeros_npz(d / f"zeros-{n}.npz", n, TEST_IMAGES)
    shards = d / f"shards-{n}"
    row = {"images": n, "npz_mb": round(npz.stat().st_size / 2**20, 1),
           "data_mb": round(n * 2 * 64 * 128 / 2**20, 1)}
    row["prepare_mb"] = round(peak_rss_mb(cli() + ["prepare", "--data", str(npz), "--out",
                                                   str(shards)]), 1)
    row["largest_shard_mb"] = round(max(p.stat().st_size for p in shards.glob("*.h5")) / 2**20, 1)
    row["inspect_mb"] = round(peak_rss_mb(cli() + ["inspect", "--data", str(npz)]), 1)
    row["predict_mb"] = round(peak_rss_mb(cli() + [
        "predict", "--ensemble", str(run), "--data", str(npz), "--out", str(d / "s.csv"),
        "--backend", "eager", "--quiet"]), 1)
    for p in shards.glob("*"):
        p.unlink()
    shards.rmdir()
    npz.unlink()
    return row


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        d = Path(tmp)
        sys.path.insert(0, str(ROOT))
        run_dir = tiny_run(d / "run")
        rows = [measure(n, d, run_dir) for n in (SIZES_QUICK if quick else SIZES)]
    return {"what": "peak RSS (MB) of marsseg-cli prepare / inspect / predict on an npz of "
                    "N zero images (savez_compressed-style), each in a fresh subprocess",
            "rows": rows}
