"""Bounded memory: prepare, inspect and predict stream an npz instead of loading it.

Each command runs in a fresh subprocess on a deflated npz of zeros (written member by
member, so this process stays small) of 1,000 and of 20,000 training images; the child's
own peak RSS (``os.wait4``) may not grow with the file. The 20,000-image file holds
312 MB of pixels more than the small one; the allowance below is a fraction of that.
`make bench` (bench/bench_memory.py) measures the same up to 200,000 images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_memory import cli, peak_rss_mb, tiny_run, write_zeros_npz  # noqa: E402

GROWTH_MB = 64  # allowed peak-RSS growth from 1,000 to 20,000 images (data: +297 MiB)
CEILING_MB = 600  # the goal for any input size


@pytest.mark.slow
def test_npz_commands_do_not_grow_with_the_file(tmp_path):
    run = tiny_run(tmp_path / "run")
    peaks = {}
    for n in (1_000, 20_000):
        npz = write_zeros_npz(tmp_path / f"z{n}.npz", n, 8)
        peaks[n] = {
            "prepare": peak_rss_mb(cli() + ["prepare", "--data", str(npz),
                                            "--out", str(tmp_path / f"shards{n}")]),
            "inspect": peak_rss_mb(cli() + ["inspect", "--data", str(npz)]),
            "predict": peak_rss_mb(cli() + ["predict", "--ensemble", str(run), "--data",
                                            str(npz), "--out", str(tmp_path / f"s{n}.csv"),
                                            "--backend", "eager", "--quiet"]),
        }
    for cmd in ("prepare", "inspect", "predict"):
        small, big = peaks[1_000][cmd], peaks[20_000][cmd]
        assert big - small < GROWTH_MB, (cmd, peaks)
        assert big < CEILING_MB, (cmd, peaks)
    assert (tmp_path / "s20000.csv").read_text().count("\n") == 9  # header + 8 rows


def test_zeros_file_is_what_the_commands_read(tmp_path):
    """The generator writes a valid course npz (read back by numpy itself)."""
    import numpy as np

    npz = write_zeros_npz(tmp_path / "z.npz", 3, 2, block=2)
    with np.load(npz) as z:
        assert z["training_set"].shape == (3, 2, 64, 128) and not z["training_set"].any()
        assert z["test_set"].shape == (2, 64, 128)
