"""Plots of a run: confusion matrix, per-class IoU, training curves, best/worst overlays,
reliability diagrams (calibration before and after the run's temperatures).

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot
global state) and written atomically. Scores come from ``evaluate`` on the
given labeled data, else from the run's scores file; training curves come from
every fold's metrics (read through `runfolder`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import CLASS_NAMES, NUM_CLASSES
from ._io import atomic_path, check_writable, read_json
from .confine import check_apart
from .data import as_batches, open_checked
from .data.source import Source
from .ensemble import Ensemble, load_ensemble
from .errors import InputError
from .inference import PredictConfig, Predictor
from .runfolder import METRICS, METRICS_BOOKKEEPING, RunFolder, fold_name
from .runfolder import read_metrics as read_metrics_file

#: background, soil, bedrock, sand, big rock
CLASS_COLORS = ("#000000", "#c48a50", "#7f7f7f", "#f2d16b", "#d62728")


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
    return path


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


# --------------------------------------------------------------------------- single plots


def plot_confusion(cm: np.ndarray, path: Path, title: str = "confusion (rows: truth)") -> Path:
    """Row-normalised confusion matrix with counts. cm int (C, C), rows = truth."""
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig = _figure(6.2, 5.2)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    n = cm.shape[0]
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * share[i, j]:.1f}%\n{cm[i, j]:,}", ha="center", va="center",
                    fontsize=7, color="white" if share[i, j] > 0.55 else "black")
    names = list(CLASS_NAMES[:n])
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of truth row")
    return _save(fig, path)


def plot_iou(rows: Sequence[dict], path: Path) -> Path:
    """Per-class IoU bars: each fold (light), ensemble and ensemble+TTA (dark)."""
    fig = _figure(8, 4.2)
    ax = fig.add_subplot()
    classes = np.arange(1, NUM_CLASSES)
    folds = [r for r in rows if r["kind"] == "fold"]
    ens = [r for r in rows if r["kind"] == "ensemble"]
    groups = folds + ens
    width = 0.8 / max(len(groups), 1)
    for k, r in enumerate(groups):
        iou = np.array([np.nan if v is None else v for v in r["iou"]], dtype=float)[classes]
        is_ens = r["kind"] == "ensemble"
        color = ("#1f4e79" if r.get("tta") else "#3a7dc2") if is_ens else "#b0c4de"
        miou = "-" if r["miou"] is None else f"{100 * r['miou']:.1f}"
        ax.bar(classes - 0.4 + width * (k + 0.5), 100 * iou, width, color=color,
               edgecolor="white", linewidth=0.3,
               label=(f"{r['name']} (mIoU {miou})" if is_ens
                      else f"{len(folds)} single folds" if k == 0 else None))
    ax.set_xticks(classes, [CLASS_NAMES[c] for c in classes])
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("per-class IoU: folds (light) and ensemble (dark)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_reliability(panels: Sequence[tuple[str, dict, dict]], path: Path) -> Path | None:
    """Reliability diagrams: accuracy against confidence per bin, before and after calibration.

    ``panels``: (title, before, after), each of the two a `metrics.CalibrationMeter.to_json()`
    (with its "bins"); one panel each. The diagonal is perfect calibration; the grey
    bars show each bin's share of the labeled pixels (right axis).
    """
    if not panels:
        return None
    fig = _figure(5.0 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, before, after) in zip(axes, panels, strict=True):
        edges = np.array(before["bins"]["edges"])
        share = ax.twinx()
        px = np.array(after["bins"]["pixels"], float)
        share.bar(edges[:-1], px / max(px.sum(), 1), width=np.diff(edges), align="edge",
                  color="#dddddd", zorder=0)
        share.set_ylabel("share of pixels (after)", fontsize=8, color="#888888")
        share.set_ylim(0, 1)
        ax.set_zorder(share.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":", label="perfect calibration")
        for m, name, color in ((before, "before", "#999999"), (after, "after", "#1f4e79")):
            conf, acc = (np.array([np.nan if v is None else v for v in m["bins"][k]], float)
                         for k in ("confidence", "accuracy"))
            ok = np.isfinite(conf) & np.isfinite(acc)
            ece = "-" if m.get("ece") is None else f"{100 * m['ece']:.2f}%"
            ax.plot(conf[ok], acc[ok], marker="o", ms=3.5, color=color,
                    label=f"{name}: ECE {ece}, NLL {m.get('nll') or float('nan'):.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence of the top label (classes 1-4)")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("reliability: labeled pixels, 15 equal-width confidence bins")
    return _save(fig, path)


def reliability_panels(run_dir: Path, scores: dict | None) -> list[tuple[str, dict, dict]]:
    """The panels `plot_reliability` draws: the scored data (scores' "calibration") and the
    out-of-fold fit set (the ensemble file's "calibration"), where present."""
    panels = []
    c = (scores or {}).get("calibration")
    if c and c["before"].get("bins") and c["before"]["pixels"]:
        what = "out-of-fold" if scores.get("mode") == "oof" else scores.get("split", "")
        panels.append((f"{c['row']} on {what} data (T: {c['applied']})", c["before"],
                       c["after"]))
    run = RunFolder(run_dir)
    cal = run.read_ensemble().calibration if run.ensemble.is_file() else None
    oof = (cal.evidence.get("oof") if cal else None) or {}
    if cal and oof.get("none") and oof.get(cal.applied):
        panels.append((f"ensemble out of fold, the fit set (T: {cal.applied})", oof["none"],
                       oof[cal.applied]))
    return panels


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """``{fold_name(member, k): [epoch records]}`` from every fold's metrics (all members)."""
    run = RunFolder(run_dir)
    if run.ensemble.is_file():
        spec = run.read_ensemble()
        folders = [(fold_name(m.name, f.fold), run.fold_path(m.name, f))
                   for m in spec.members for f in m.folds]
    else:
        folders = [(run.path.name, run.path)]
    out: dict[str, list[dict]] = {}
    for name, folder in folders:
        recs = read_metrics_file(folder / METRICS)
        if recs:
            out[name] = recs
    return out




def _series(recs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Curve name -> (epoch, value) points; per-class lists become one curve per class."""
    out: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(recs):
        x = r.get("epoch", i)
        for k, v in r.items():
            if k in METRICS_BOOKKEEPING or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                out.setdefault(k, []).append((x, v))
            elif isinstance(v, list) and len(v) == NUM_CLASSES:
                for c, vc in enumerate(v):
                    if isinstance(vc, (int, float)):
                        out.setdefault(f"{k} {CLASS_NAMES[c]}", []).append((x, vc))
    return out


def _panel(name: str) -> str:
    """train_loss / val_loss / loss share the 'loss' panel."""
    for pre in ("train_", "val_"):
        if name.startswith(pre) and name[len(pre):] in ("loss",):
            return name[len(pre):]
    return name


def plot_curves(metrics: dict[str, list[dict]], path: Path) -> Path | None:
    """One panel per metric (loss, mIoU, per-class IoU, lr ...), one line per fold, x = epoch.

    Train and validation losses share a panel (validation dashed)."""
    series = {name: _series(recs) for name, recs in metrics.items()}
    panels: list[str] = []
    for s in series.values():
        for k in s:
            if _panel(k) not in panels:
                panels.append(_panel(k))
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig = _figure(4.2 * cols, 3.0 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab10"]
    names = list(metrics)
    members = list(dict.fromkeys(n.split("/")[0] for n in names))

    def color(name):  # one colour per fold when few, else per member
        if len(names) <= 10:
            return cmap(names.index(name))
        return cmap(members.index(name.split("/")[0]) % 10)

    for ax, panel in zip(axes, panels, strict=False):
        labeled: set[str] = set()
        for name, s in series.items():
            for key, pts in s.items():
                if _panel(key) != panel:
                    continue
                x, y = zip(*pts, strict=True)
                label = None if name in labeled else name
                labeled.add(name)
                ax.plot(x, y, color=color(name), alpha=0.85, lw=1.2,
                        ls="--" if key.startswith("val_") and panel == "loss" else "-",
                        marker="." if len(x) < 15 else None,
                        label=label)
        has_val = any(k.startswith("val_") and _panel(k) == panel
                      for s in series.values() for k in s)
        ax.set_title(panel + (" (train solid, val dashed)" if panel == "loss" and has_val
                              else ""), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel == "lr":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6, ncol=1 + len(metrics) // 8)
    fig.suptitle("training curves of every fold")
    return _save(fig, path)


def plot_overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, disagreement: np.ndarray,
                  titles: Sequence[str], path: Path, heading: str) -> Path:
    """Rows of image | truth | prediction | member disagreement. Shapes (n, H, W)."""
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(CLASS_COLORS)
    n = len(images)
    fig = _figure(13, 1.9 * n + 0.6)
    axes = fig.subplots(n, 4, squeeze=False)
    for i in range(n):
        panels = ((images[i], "gray", 0, 255, "image"),
                  (truth[i], cmap, 0, NUM_CLASSES - 1, "truth"),
                  (pred[i], cmap, 0, NUM_CLASSES - 1, "prediction"),
                  (disagreement[i], "magma", 0, 1, "member disagreement"))
        for ax, (a, cm, lo, hi, name) in zip(axes[i], panels, strict=True):
            ax.imshow(a, cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        axes[i, 0].set_ylabel(titles[i], fontsize=8)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=nm) for c, nm in zip(CLASS_COLORS, CLASS_NAMES,
                                                                  strict=True)],
               loc="lower center", ncol=NUM_CLASSES, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(heading)
    return _save(fig, path)


# --------------------------------------------------------------------------- the report


def _pick_rows(data: Source, split: str, ids: np.ndarray, batch_size: int = 256):
    """images and masks of the given ids (streaming; only those rows are kept)."""
    want = set(int(i) for i in ids)
    got: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for b_ids, b_img, b_mask in as_batches(data, split, batch_size, with_masks=True):
        for k, i in enumerate(b_ids):
            if int(i) in want:
                got[int(i)] = (b_img[k], b_mask[k])
    return (np.stack([got[int(i)][0] for i in ids]), np.stack([got[int(i)][1] for i in ids]))


def _overlay_predictions(ens: Ensemble, pred: Predictor, scores: dict, ids: np.ndarray,
                         images: np.ndarray):
    """Ensemble labels and disagreement for the chosen images; out-of-fold in OOF mode
    (each image from the folds that held it out, `Ensemble.subset`)."""
    if scores.get("mode") != "oof":
        r = pred(ids, images, want_disagreement=True)
        return r.labels, r.disagreement
    labels = np.zeros(images.shape, np.uint8)
    dis = np.zeros(images.shape, np.float32)
    folds = sorted({m.fold for m in ens.models})
    for k, vids in RunFolder(ens.run_dir).val_ids().items():
        rows = np.flatnonzero(np.isin(ids, vids))
        if k in folds and len(rows):
            r = Predictor(ens.subset([k]), pred.cfg, pred.rt)(ids[rows], images[rows],
                                                             want_disagreement=True)
            labels[rows], dis[rows] = r.labels, r.disagreement
    return labels, dis


def report(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
           data: str | os.PathLike | None = None, cfg: PredictConfig = PredictConfig(),
           members: Sequence[str] | None = None, folds: Sequence[int] | None = None,
           split: str | None = None, n_overlays: int = 4, progress: bool = False) -> dict:
    """Write the report PNGs into ``out_dir`` (created); returns {"files": [...], "notes": [...]}.

    With ``data`` (labeled) the scores are computed now (``evaluate``, also updating
    scores.json); without it they come from ``<run>/scores.json`` and overlays are skipped.
    """
    from .evaluate import evaluate as run_evaluate

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder does not exist")
    if not out_dir.parent.is_dir():
        raise InputError(f"{out_dir}: parent folder {out_dir.parent} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    check_apart(out_dir, "--out", run=run_dir, data=data)
    files: list[str] = []
    notes: list[str] = []
    scores = None
    scores_path = RunFolder(run_dir).scores
    check_writable(out_dir if out_dir.is_dir() else out_dir.parent)
    ens = rt = None
    if data is not None:  # configure once: data, ensemble, resolution; evaluate and overlays share them
        data = open_checked(data)
        ens = load_ensemble(run_dir, members, folds)
        rt = cfg.resolve()
        scores = run_evaluate(run_dir, data, cfg=cfg, split=split, progress=progress, rt=rt,
                              ensemble=ens)
    elif scores_path.is_file():
        scores = read_json(scores_path, "scores file")
        notes.append(f"scores from {scores_path}; pass --data for overlays")
    else:
        notes.append("no --data and no scores.json: only training curves")
    with _new_files(out_dir, files):
        _write_plots(run_dir, out_dir, data, cfg, ens, rt, scores, n_overlays, files, notes)
    return {"files": files, "notes": notes, "scores": scores.get("path") if scores else None}


@contextlib.contextmanager
def _new_files(out_dir: Path, files: list[str]):
    """Creates `out_dir` if needed; on any failure (a full disk included) the PNGs listed
    in `files` so far are removed, and `out_dir` too when this call created it."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(exist_ok=True)
        yield
    except BaseException:
        for f in files:
            Path(f).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def _write_plots(run_dir, out_dir, data, cfg, ens, rt, scores, n_overlays, files,
                 notes) -> None:
    pred = None
    curves = plot_curves(read_metrics(run_dir), out_dir / "training_curves.png")
    if curves:
        files.append(str(curves))
    else:
        notes.append("no training metrics found: no training curves")
    if scores:
        best = scores["rows"][-1]
        files.append(str(plot_confusion(
            np.array(scores["confusion"]), out_dir / "confusion.png",
            f"{best['name']} on {'out-of-fold ' if scores['mode'] == 'oof' else ''}"
            f"{scores['split']} split "
            f"(mIoU {100 * (best['miou'] or 0):.2f}; rows: truth)")))
        files.append(str(plot_iou(scores["rows"], out_dir / "iou.png")))
    reliability = plot_reliability(reliability_panels(run_dir, scores), out_dir / "reliability.png")
    if reliability:
        files.append(str(reliability))
    if scores and data is not None and scores["per_image"]["ids"]:
        ids = np.array(scores["per_image"]["ids"], np.int64)
        s = np.array([np.nan if v is None else v for v in scores["per_image"]["miou"]])
        ok = np.flatnonzero(np.isfinite(s))
        order = ok[np.argsort(s[ok], kind="stable")]
        k = min(n_overlays, len(order) // 2 if len(order) > 1 else len(order))
        for tag, pick in (("best", order[::-1][:k]), ("worst", order[:k])):
            if not len(pick):
                continue
            pick_ids = ids[pick]
            srt = np.argsort(pick_ids)
            images, truth = _pick_rows(data, scores["split"], pick_ids[srt])
            back = np.argsort(srt)  # restore best-first / worst-first order
            images, truth = images[back], truth[back]
            pred = pred or Predictor(ens, cfg, rt)
            labels, dis = _overlay_predictions(ens, pred, scores, pick_ids, images)
            titles = [f"id {i}\nmIoU {100 * s[p]:.1f}" for i, p in zip(pick_ids, pick,
                                                                       strict=True)]
            files.append(str(plot_overlays(images, truth, labels, dis, titles,
                                           out_dir / f"overlays_{tag}.png",
                                           f"{tag} {k} images by per-image mIoU "
                                           f"({scores['rows'][-1]['name']})")))
