"""Parameters and forward GFLOPs of every registered model at base width 32.

Input (1, 1, 64, 128), eval mode; FLOPs counted by torch.utils.flop_counter
(convolutions and matmuls, 2 FLOPs per multiply-add). The full run also times
a CPU forward pass of a batch of 8 (best of 5, round-robin) — relative numbers only, the
machine is shared. `python -m bench models`.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from marsseg.models import MODELS, build_model, count_parameters

ALL_OPTIONS = {"se": "all", "aspp": True, "residual": True, "attention_gates": True,
               "self_attention": True, "deep_supervision": True}


def _variants() -> list[tuple[str, str, dict]]:
    rows = [(name, name, {}) for name in MODELS]
    rows.append(("unet (all options)", "unet", ALL_OPTIONS))
    return rows


def measure(name: str, args: dict, base_width: int = 32) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_model(name, base_width=base_width, **args).eval()
    x = torch.rand(1, 1, 64, 128) * 255
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return model, {"params": count_parameters(model),
                   "gflops": round(counter.get_total_flops() / 1e9, 3)}


def run(quick: bool = False) -> dict:
    models, table = {}, {}
    for label, name, args in _variants():
        models[label], table[label] = measure(name, args)
    if not quick:
        # round-robin, best of 5: the machine is shared, the minimum is the
        # least disturbed measurement
        xb = torch.rand(8, 1, 64, 128) * 255
        best = dict.fromkeys(models, float("inf"))
        with torch.no_grad():
            for _ in range(5):
                for label, model in models.items():
                    t0 = time.perf_counter()
                    model(xb)
                    best[label] = min(best[label], time.perf_counter() - t0)
        for label in models:
            table[label]["cpu_forward_ms_b8"] = round(1000 * best[label], 1)
    header = f"{'model':22s} {'params':>11s} {'GFLOPs':>7s}" + ("" if quick else f" {'ms (b=8)':>9s}")
    print(header)
    for label, r in table.items():
        line = f"{label:22s} {r['params']:>11,d} {r['gflops']:>7.3f}"
        if not quick:
            line += f" {r['cpu_forward_ms_b8']:>9.1f}"
        print(line)
    return {"input": [1, 1, 64, 128], "base_width": 32, "threads": torch.get_num_threads(),
            "models": table}


if __name__ == "__main__":
    run()
