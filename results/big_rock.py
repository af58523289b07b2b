"""Probe: where does the ensemble lose big rock? (results/real-mars.md, round 2.)

Reads a finished run folder's oof.h5 files (out of fold, no TTA) of the given folds,
averages the given members with the given weights, and reports for the true big-rock
regions (connected components of class 4 in each labeled crop), by region size: how many,
their share of the big-rock pixels, the share found (recall) and the share called bedrock;
then overall recall and precision and what the false big-rock calls really are. The
training masks only: the gold masks are never read. Usage:
    .venv/bin/python results/big_rock.py RUN MEMBER,... WEIGHT,... FOLD,... [SHARDS] [--png OUT]
(SHARDS default: RUN/../shards; --png: the crops of the largest regions, with their label
and the ensemble's prediction.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

SIZES = ((0, 50), (50, 200), (200, 1000), (1000, None))  # region size in pixels
NAMES = ("background", "soil", "bedrock", "sand", "big rock")


def labels(run: Path, members: list[str], weights: list[float], fold: int):
    """(ids, the weighted ensemble's argmax over classes 1-4) of one fold's oof.h5 files."""
    acc, ids = None, None
    for m, w in zip(members, weights, strict=True):
        with h5py.File(run / m / f"fold_{fold}" / "oof.h5", "r") as f:
            got, p = f["ids"][()], f["probs"][()].astype(np.float32)
        if ids is not None and not np.array_equal(ids, got):
            sys.exit(f"{run / m / f'fold_{fold}' / 'oof.h5'}: other ids than {members[0]}'s")
        ids, acc = got, w * p if acc is None else acc + w * p
    return ids, acc[:, 1:].argmax(1).astype(np.uint8) + 1


def bucket(size: int) -> int:
    return next(i for i, (lo, hi) in enumerate(SIZES) if size >= lo and (hi is None or size < hi))


def draw(rows: list, out: Path) -> None:
    """Crop, label and prediction of each (size, id, found, image, truth, pred) in `rows`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = matplotlib.colors.ListedColormap(["black", "#c8a165", "#7f7f7f", "#f2e34c", "#d62728"])
    fig, ax = plt.subplots(len(rows), 3, figsize=(9, 1.6 * len(rows)), squeeze=False)
    for a, (size, i, found, image, truth, pred) in zip(ax, rows, strict=True):
        a[0].imshow(image, cmap="gray")
        a[1].imshow(truth, cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
        a[2].imshow(np.where(truth > 0, pred, 0), cmap=cmap, vmin=0, vmax=4,
                    interpolation="nearest")
        a[0].set_title(f"id {i}: big rock {size} px", fontsize=8)
        a[1].set_title("label", fontsize=8)
        a[2].set_title(f"prediction: {found:.0f} % of it found", fontsize=8)
        for x in a:
            x.axis("off")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    tmp.replace(out)
    print(f"-> {out}")


def main(argv: list[str]) -> None:
    png = None
    if "--png" in argv:
        at = argv.index("--png")
        png, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    if len(argv) not in (4, 5):
        sys.exit(__doc__)
    from marsseg.data import load_split

    run = Path(argv[0])
    members, weights = argv[1].split(","), [float(w) for w in argv[2].split(",")]
    folds = [int(k) for k in argv[3].split(",")]
    split = load_split(Path(argv[4]) if len(argv) == 5 else run.parent / "shards", "train")
    row = {int(i): r for r, i in enumerate(split.ids)}
    found, called_bedrock, pixels, regions = (np.zeros(len(SIZES)) for _ in range(4))
    calls = np.zeros(5)  # the true class of every big-rock call
    largest = []  # (size, id, found %, image, truth, pred) of regions of the last bucket
    for k in folds:
        ids, pred = labels(run, members, weights, k)
        rows = [row[int(i)] for i in ids]
        for i, image, truth, lab in zip(ids, split.images[rows], split.masks[rows], pred,
                                        strict=True):
            calls += np.bincount(truth[(lab == 4) & (truth > 0)], minlength=5)
            comp, n = ndimage.label(truth == 4)
            for j in range(1, n + 1):
                region = comp == j
                b = bucket(int(region.sum()))
                regions[b] += 1
                pixels[b] += region.sum()
                found[b] += (lab[region] == 4).sum()
                called_bedrock[b] += (lab[region] == 2).sum()
                if b == len(SIZES) - 1:
                    largest.append((int(region.sum()), int(i), 100 * (lab[region] == 4).mean(),
                                    image, truth, lab))
    print(f"{run.name} ({','.join(members)} weighted {argv[2]}), folds {argv[3]}, out of fold, "
          "no TTA")
    print("| big-rock region | regions | share of big-rock pixels | found (recall) | called bedrock |")
    print("|---|---|---|---|---|")
    for b, (lo, hi) in enumerate(SIZES):
        span = f"{lo}–{hi - 1} px" if hi is not None else f"≥ {lo} px"
        print(f"| {span} | {int(regions[b])} | {100 * pixels[b] / pixels.sum():.0f} % | "
              f"{100 * found[b] / pixels[b]:.1f} % | {100 * called_bedrock[b] / pixels[b]:.1f} % |")
    print(f"recall {100 * found.sum() / pixels.sum():.1f} %, precision "
          f"{100 * calls[4] / calls.sum():.1f} %; the false big-rock calls are "
          + ", ".join(f"{NAMES[c]} {100 * calls[c] / (calls.sum() - calls[4]):.0f} %"
                      for c in (1, 2, 3)))
    if png is not None:
        draw(sorted(largest, key=lambda r: -r[0])[:6], png)


if __name__ == "__main__":
    main(sys.argv[1:])
