"""Submission CSV writer vs pandas ``DataFrame.to_csv`` on the same masks (goal >= 12x)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False) -> dict:
    import pandas as pd

    from marsseg.submission import SubmissionWriter, read_submission

    n = 200 if quick else 1000
    rng = np.random.default_rng(0)
    ids = np.arange(n, dtype=np.int64) + 10000  # realistic 5-digit ids
    masks = rng.integers(0, 5, (n, 64, 128), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as d:
        ours, theirs = Path(d) / "ours.csv", Path(d) / "pandas.csv"

        def write_ours(validate: bool = True):
            with SubmissionWriter(ours, expected_rows=n, validate=validate) as w:
                for s in range(0, n, 256):
                    w.write(ids[s:s + 256], masks[s:s + 256])

        def write_pandas():
            df = pd.DataFrame(masks.reshape(n, -1), columns=[str(i) for i in range(64 * 128)])
            df.insert(0, "id", ids)
            df.to_csv(theirs, index=False)

        t_ours = _best_of(write_ours, 3)
        t_ours_novalidate = _best_of(lambda: write_ours(False), 3)
        t_pandas = _best_of(write_pandas, 1 if not quick else 1)
        same = ours.read_bytes() == theirs.read_bytes()
        size = ours.stat().st_size
        got_ids, got = read_submission(ours)
        assert (got_ids == ids).all() and (got == masks).all()
    mb = size / 1e6
    return {
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "rows": n,
        "file_mb": round(mb, 2),
        "ours_s": round(t_ours, 4),
        "ours_mb_per_s": round(mb / t_ours, 1),
        "ours_without_validation_s": round(t_ours_novalidate, 4),
        "pandas_s": round(t_pandas, 4),
        "pandas_mb_per_s": round(mb / t_pandas, 1),
        "speedup_vs_pandas": round(t_pandas / t_ours, 1),
        "goal_speedup": 12,
        "byte_identical_to_pandas": same,
        "projected_s_10022_rows": round(t_ours * 10022 / n, 2),
    }
