"""Score a run folder on labeled data: every single fold, the ensemble, the ensemble with TTA.

One pass over the data: per batch, each fold model sees all TTA views in one
forward pass, which gives its plain score (identity view) and its TTA score,
and feeds the plain and TTA ensemble averages. Scores follow the course metric
(``metrics.course_miou``: truth-0 pixels dropped), beside per-class IoU and
pixel accuracy.

Two modes:
- ``test``: all models on all images of a labeled split (test shards with masks,
  or an npz with ``test_masks``).
- ``oof`` (split ``train``): each fold model only on its own validation images
  (the run's splits), the ensemble per image from the folds that held it out —
  the honest score when the test split has no masks; the data must be the data
  the run was made from.

The ensemble rows use the run's calibration (`temperature`: member or ensemble
temperatures, argmax essentially unchanged), as predict does; the scores file's
"calibration" holds NLL, ECE and mIoU of the headline row without and with them.

Results go to the run folder's scores file (atomic write, under the run's lock).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import CLASS_NAMES
from ._io import write_json_atomic
from ._progress import pct, progress_bar
from .backends import stderr_line
from .data import open_checked, prescan, reads_data, split_info, stream_batches
from .data.source import ShardSource, Source
from .device import Resolved
from .ensemble import Ensemble, load_ensemble
from .errors import InputError
from .folds import ALL
from .inference import PredictConfig, Predictor, mean_views, needs_conversion, to_labels
from .metrics import CalibrationMeter, ConfusionMeter, confusion_matrix, course_miou, round_score
from .runfolder import RunFolder, data_fingerprint, fold_name
from .temperature import apply_temperature
from .tracking import log_group, score_values

CALIBRATION_DEFINITION = (
    "labeled pixels (truth 1-4), probabilities renormalised over classes 1-4; NLL in nats; "
    "ECE over 15 equal-width bins of the top label's confidence (metrics.CalibrationMeter)")


def _row(meter: ConfusionMeter, name: str, kind: str, tta: bool) -> dict:
    """One row of the scores: course mIoU, pixel accuracy and per-class IoU of ``meter``."""
    return {"name": name, "kind": kind, "tta": tta, "images": meter.images,
            "miou": round_score(meter.miou()), "pixel_accuracy": round_score(meter.accuracy()),
            "iou": [round_score(v) for v in meter.iou()]}


def per_image_miou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Course mIoU of each image on its own. Shape: (b, H, W) x2 -> float (b,), NaN if unlabeled."""
    return np.array([course_miou(confusion_matrix(p, t)) for p, t in zip(pred, truth, strict=True)])


def _labeled(data: Source, split: str) -> bool:
    return bool(split_info(data, split)["labeled"])


def choose_split(data: str | os.PathLike | Source, split: str | None) -> str:
    """``test`` when it has masks, else ``train`` (out-of-fold); an explicit split must be labeled."""
    data = open_checked(data)
    if split is None:
        return "test" if _labeled(data, "test") else "train"
    if split == "test" and not _labeled(data, "test"):
        raise InputError(f"{data}: the test split has no masks; use --split train for "
                         "out-of-fold scores")
    return split


def _check_oof_data(run: RunFolder, data: Source) -> None:
    """Out-of-fold scores only mean something on the data the run was trained on."""
    if isinstance(data, ShardSource):
        run.check_data(data_fingerprint(data))
    else:
        run.check_source(data.path)


class _Pass:
    """One scoring pass: the meters of every fold (plain and TTA), of the ensemble (plain
    and TTA) and the per-image scores, fed batch by batch.

    ``val_ids`` (out-of-fold mode): fold -> its validation ids; each fold model then only
    sees its own validation images, weighted by its member's whole share.
    """

    def __init__(self, ens, pred: Predictor, cfg: PredictConfig, val_ids: dict | None):
        self.ens, self.pred, self.classes = ens, pred, cfg.classes
        self.views = cfg.views
        self.tta = len(self.views) > 1
        self.val_ids = val_ids
        self.members = list(dict.fromkeys(m.member for m in ens.models))
        # OOF: one fold per member sees each image, so that fold carries the member's share.
        self.share = {n: sum(m.weight for m in ens.models if m.member == n) for n in self.members}
        self.fold_m = {m.name: ConfusionMeter(full=True) for m in ens.models}
        self.fold_t = {m.name: ConfusionMeter(full=True) for m in ens.models}
        self.ens_m, self.ens_t = ConfusionMeter(full=True), ConfusionMeter(full=True)
        # the headline row (ensemble, +TTA when on) without and with the temperatures
        self.raw = ConfusionMeter(full=True)
        self.cal_before, self.cal_after = CalibrationMeter(), CalibrationMeter()
        self.img_ids: list[np.ndarray] = []
        self.img_scores: list[np.ndarray] = []

    def _labels(self, probs: torch.Tensor) -> np.ndarray:
        return to_labels(probs, self.classes).cpu().numpy()

    def _rows(self, ids: np.ndarray, splits) -> list[np.ndarray | None] | None:
        """Per fold model, the batch positions it scores: all (None) in test mode; in
        out-of-fold mode only its own validation images."""
        if self.val_ids is None:
            return None
        rows = []
        for fm in self.ens.models:
            if fm.fold not in self.val_ids:
                raise InputError(f"{splits}: no fold {fm.fold}")
            rows.append(np.flatnonzero(np.isin(ids, self.val_ids[fm.fold])))
        return rows

    def batch(self, ids: np.ndarray, images: np.ndarray, masks: np.ndarray, splits) -> None:
        """Score one batch. Shape: ids (b,), images and masks uint8 (b, H, W)."""
        b = len(ids)
        rows = self._rows(ids, splits)
        acc_m = acc_t = raw = None
        cover = np.zeros(b)
        for k, ps in self.pred.member_views(images, rows, calibrated=False):
            fm = self.ens.models[k]
            # OOF: one fold per member sees each image, so that fold carries the member's share
            w = fm.weight if rows is None else self.share[fm.member]
            pos = np.arange(b) if rows is None else rows[k]
            sel = torch.from_numpy(pos).to(ps[0].device)
            if acc_m is None:
                acc_m = torch.zeros(b, *ps[0].shape[1:], device=ps[0].device)
                acc_t, raw = torch.zeros_like(acc_m), torch.zeros_like(acc_m)
            raw.index_add_(0, sel, mean_views(ps) * w)  # acc_t (or acc_m) without temperature
            ps = [apply_temperature(p, fm.temperature) for p in ps]  # argmax unchanged
            plain = ps[0]
            both = mean_views(ps) if self.tta else plain
            truth = masks[pos]
            self.fold_m[fm.name].update(self._labels(plain), truth)
            if self.tta:
                self.fold_t[fm.name].update(self._labels(both), truth)
            if acc_m is None:
                acc_m = torch.zeros(b, *plain.shape[1:], device=plain.device)
                acc_t = torch.zeros_like(acc_m)
            acc_m.index_add_(0, sel, plain * w)
            acc_t.index_add_(0, sel, both * w)
            cover[pos] += w
        done = cover > 1 - 1e-6  # every selected member contributed (always, in test mode)
        if done.any():
            truth = masks[done]
            dsel = torch.from_numpy(np.flatnonzero(done)).to(acc_m.device)
            t_ens = self.ens.temperature
            lab_m = self._labels(apply_temperature(acc_m[dsel], t_ens))
            self.ens_m.update(lab_m, truth)
            best = apply_temperature(acc_t[dsel], t_ens)
            lab_t = self._labels(best) if self.tta else lab_m
            if self.tta:
                self.ens_t.update(lab_t, truth)
            self.raw.update(self._labels(raw[dsel]), truth)
            self.cal_before.update(raw[dsel], truth)
            self.cal_after.update(best, truth)
            self.img_ids.append(ids[done])
            self.img_scores.append(per_image_miou(lab_t, truth))

    def scores(self) -> dict:
        """The rows (folds, ensemble, ensemble+tta), confusion and per-image part of the result."""
        models = self.ens.models
        rows = [_row(self.fold_m[m.name], m.name, "fold", False) for m in models]
        if self.tta:
            for r, m in zip(rows, models, strict=True):
                r["miou_tta"] = round_score(self.fold_t[m.name].miou())
        rows.append(_row(self.ens_m, "ensemble", "ensemble", False))
        best = self.ens_m
        if self.tta:
            rows.append(_row(self.ens_t, "ensemble+tta", "ensemble", True))
            best = self.ens_t
        ids = np.concatenate(self.img_ids) if self.img_ids else np.zeros(0, np.int64)
        per = np.concatenate(self.img_scores) if self.img_scores else np.zeros(0)
        return {"rows": rows,
                "confusion": best.cm.tolist(),  # truth 0 kept, rows = truth, cols = prediction
                "per_image": {"ids": ids.tolist(), "miou": [round_score(v) for v in per]},
                "calibration": self._calibration(rows[-1])}

    def _calibration(self, row: dict) -> dict:
        """NLL, ECE and mIoU of the headline row without and with the run's temperatures."""
        temps = {m.member: m.temperature for m in self.ens.models}
        return {"applied": self.ens.calibration, "temperature": self.ens.temperature,
                "members": temps if self.ens.calibration == "members" else {},
                "row": row["name"], "definition": CALIBRATION_DEFINITION,
                "before": {**self.cal_before.to_json(), "miou": round_score(self.raw.miou())},
                "after": {**self.cal_after.to_json(), "miou": row["miou"]}}


def _check_held_out(run: RunFolder, ens: Ensemble, val_ids: dict) -> None:
    """Out-of-fold mode scores each fold model on its own validation part: refuse a model
    that has none (a fold "all", trained on every image) or a fold the splits lack."""
    for m in ens.models:
        if m.fold in val_ids:
            continue
        if m.path.name == run.fold_dir(m.member, ALL).name:
            raise InputError(f"{run.path}: {fold_name(m.member, ALL)} was trained on every "
                             "image (fold 'all'), so none is held out from it and --split train "
                             "(out-of-fold) cannot score it; use --split test (needs masks), or "
                             "evaluate the run it was distilled from for out-of-fold scores")
        raise InputError(f"{run.splits}: no fold {m.fold} (the splits have folds "
                         f"{sorted(val_ids)}), so {m.name} has no out-of-fold images")


def _val_ids(run: RunFolder, data: Path, total: int) -> dict[int, np.ndarray]:
    """Fold -> validation ids of the run's splits, checked against the train split's size."""
    val_ids = {k: np.asarray(v, np.int64) for k, v in run.val_ids().items()}
    n = sum(len(v) for v in val_ids.values())
    if total != n:
        raise InputError(f"{data}: the train split holds {total} images, {run.splits} "
                         f"splits {n}; not the data this run was trained on")
    return val_ids


@reads_data
def evaluate(run_dir: str | os.PathLike, data: str | os.PathLike | Source, *,
             cfg: PredictConfig = PredictConfig(), members: Sequence[str] | None = None,
             folds: Sequence[int] | None = None, split: str | None = None,
             progress: bool = False, write: bool = True, rt: Resolved | None = None,
             ensemble: Ensemble | None = None) -> dict:
    """Score single folds, the ensemble and the ensemble with TTA on labeled data.

    ``cfg.tta`` False skips the TTA rows. Returns the scores dict (also written to
    the run folder's scores file when ``write``); scores are fractions 0..1.
    ``rt`` and ``ensemble``: the caller's resolution and loaded ensemble (`report`);
    by default resolved (`PredictConfig.resolve`) and loaded here, once.
    """
    run_dir, data = Path(run_dir), open_checked(data)
    split = choose_split(data, split)
    run = RunFolder(run_dir if run_dir.is_dir() else run_dir.parent)
    oof = split == "train"
    if oof:
        _check_oof_data(run, data)
    data.check(split)
    total = int(split_info(data, split)["count"])
    if total == 0:
        raise InputError(f"{data}: the {split} split holds no images; nothing to score")
    ens = ensemble if ensemble is not None else load_ensemble(run_dir, members, folds)
    rt = rt if rt is not None else cfg.resolve()
    if write:
        run.check_writable()
    val_ids = _val_ids(run, data, total) if oof else None
    if oof:
        _check_held_out(run, ens, val_ids)
    all_val = np.concatenate(list(val_ids.values())) if oof else None
    if needs_conversion(ens, cfg, rt, total):
        # bad data must fail before a backend conversion is shown or cached in the run folder
        ids = prescan(data, split, cfg.batch_size, with_masks=True)
        matched = int(np.isin(ids, all_val).sum()) if oof else len(ids)
        _check_scored(run, data, split, matched, total if not oof else len(all_val), matched)
    pred = Predictor(ens, cfg, rt, log=stderr_line if progress else None, calib_data=data,
                     n_images=total)
    scoring = _Pass(ens, pred, cfg, val_ids)
    matched = 0
    t0 = time.perf_counter()
    with progress_bar(total, f"evaluate ({'out-of-fold' if oof else split})", progress) as advance, \
            torch.inference_mode():
        for ids, images, masks in stream_batches(data, split, cfg.batch_size, with_masks=True):
            matched += int(np.isin(ids, all_val).sum()) if oof else len(ids)
            scoring.batch(ids, images, masks, run.splits)
            advance(len(ids))
    dt = time.perf_counter() - t0
    _check_scored(run, data, split, matched, total if not oof else len(all_val),
                  scoring.ens_m.images)
    result = {
        "format_version": 1,
        "run": str(run_dir), "data": str(data), "split": split,
        "mode": "oof" if oof else "test", "images": total,
        "classes": cfg.classes, "views": len(cfg.views), "precision": rt.precision,
        "backend": rt.backend, "device": str(rt.device), "seconds": round(dt, 2),
        "class_names": list(CLASS_NAMES), "members": scoring.members, "models": ens.names,
        **scoring.scores(),
    }
    if write:
        with run.lock():
            write_json_atomic(run.scores, result)
        result["path"] = str(run.scores)
        log_group(run.path, {k: v for r in result["rows"] if r["kind"] == "ensemble"
                             for k, v in score_values(f"{result['mode']}/{_key(r)}", r["miou"],
                                                      r["iou"]).items()})
    return result


def _key(row: dict) -> str:
    return "ensemble_tta" if row["tta"] else "ensemble"  # tracker keys: no "+"


def _check_scored(run: RunFolder, data: Path, split: str, matched: int, expected: int,
                  scored: int) -> None:
    """Refuse to write scores when the data did not match the run (nothing or part scored)."""
    if split == "train" and matched != expected:
        raise InputError(f"{data}: {matched} of the {expected} image ids in "
                         f"{run.splits} found in the train split; "
                         "not the data this run was trained on")
    if scored == 0:
        raise InputError(f"{data}: no image of the {split} split could be scored")


def format_table(result: dict):
    """A rich Table of a scores dict (values x100)."""
    from rich.table import Table

    t = Table(title=f"scores on {result['data']} ({result['mode']}, {result['images']} images, "
                    f"classes={result['classes']})")
    t.add_column("model")
    t.add_column("mIoU", justify="right")
    if any("miou_tta" in r for r in result["rows"]):
        t.add_column("mIoU +TTA", justify="right")
    t.add_column("pixel acc", justify="right")
    for name in result["class_names"][1:]:
        t.add_column(name, justify="right")
    has_tta_col = any("miou_tta" in r for r in result["rows"])
    for r in result["rows"]:
        cells = [r["name"], pct(r["miou"])]
        if has_tta_col:
            cells.append(pct(r.get("miou_tta")))
        cells.append(pct(r["pixel_accuracy"]))
        cells += [pct(v) for v in r["iou"][1:]]
        style = "bold" if r["kind"] == "ensemble" else None
        t.add_row(*cells, style=style)
    return t


def format_calibration(result: dict) -> str:
    """One line: the headline row's NLL, ECE and mIoU without -> with the run's temperatures."""
    c = result.get("calibration")
    if not c:
        return ""
    b, a = c["before"], c["after"]

    def num(v, scale=1.0, digits=4):
        return "-" if v is None else f"{scale * v:.{digits}f}"

    if c["applied"] == "ensemble":
        how = f"ensemble T={c['temperature']:.3f}"
    elif c["applied"] == "members":
        how = "member T " + ", ".join(f"{m}={t:.3f}" for m, t in c["members"].items())
    else:
        how = "none: T=1 (run select or calibrate)"
    return (f"calibration of {c['row']} ({how}), {b['pixels']} labeled pixels: "
            f"NLL {num(b['nll'])} -> {num(a['nll'])}, ECE {num(b['ece'], 100, 2)}% -> "
            f"{num(a['ece'], 100, 2)}%, mIoU {num(b['miou'], 100, 2)} -> {num(a['miou'], 100, 2)}")
