"""Run the benchmarks: `python -m bench [name ...]` (make bench).

Each `bench/bench_<name>.py` exposes `run(quick: bool = False) -> dict`; the
ratios it reports are measured side by side in that one run. Results are
printed and written to `bench/results/<name>.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import time
from pathlib import Path

from marsseg._io import atomic_path

HERE = Path(__file__).resolve().parent


def main() -> None:
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(HERE)])
                   if m.name.startswith("bench_"))
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("names", nargs="*", choices=names + [[]], help="benchmarks to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args()
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    for name in args.names or names:
        mod = importlib.import_module(f"bench.bench_{name}")
        t0 = time.perf_counter()
        result = mod.run(quick=args.quick)
        result.setdefault("wall_s", round(time.perf_counter() - t0, 2))
        result.setdefault("machine", {"cpus": os.cpu_count()})
        path = out_dir / f"{name}.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        print(f"== {name} -> {path}")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
