"""A teacher ensemble's targets, made once: out-of-fold probabilities for the labeled images,
TTA-averaged probabilities for the unlabeled ones (the file format: `teaching`).

The teacher is a finished train-folds run folder. Its members and weights are the ones
its ensemble file selects (as `predict` uses them). A labeled image's target is the
weighted average of the out-of-fold predictions (``oof.h5``) of the members whose fold
held that image out, so no image is taught by a model that saw it; an image of a fold the
teacher did not train has no target. The unlabeled images (the test split: its images
only, never its masks) get the ensemble's prediction with flip TTA on the eager backend,
which writes nothing into the teacher's run folder; they are stored twice: the whole
ensemble's (they teach distill's fold "all" student, which holds no image out) and the
teacher's fold-0 models' only (they teach the fold-0 student, whose held-out part is fold 0's
validation images: the other folds' models trained on those), as for the pseudo-labels below.

train-folds --teacher labels the unlabeled images once per fold instead
(`write_pseudo_labels`): fold k of the run by the teacher's fold-k models only. The teacher's
models of the other folds were trained on fold k's validation images, so their labels would
carry those images into fold k's training part and make its out-of-fold score optimistic;
the fold-k models never saw them, which is why the teacher must have the run's splits
(`check_splits`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import atomic_path
from .config import ModelConfig
from .device import Resolved
from .errors import InputError
from .folds import ALL
from .records import EnsembleSpec, FoldSpec
from .runfolder import OOF, RunFolder, fold_name, read_oof
from .teaching import (
    TargetsRecord,
    pseudo_keys,
    unlabeled_keys,
    write_pseudo_file,
    write_targets_file,
)


def teacher_sha256(spec: EnsembleSpec) -> str:
    """sha256 of what an ensemble file predicts with: the selected members of weight > 0,
    their weights and the sha256 of every fold's weights."""
    selected = set(spec.chosen)
    key = [{"name": m.name, "weight": float(m.weight),
            "folds": sorted([f.fold, f.sha256] for f in m.folds)}
           for m in spec.members if m.name in selected and m.weight > 0]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Teacher:
    """A checked teacher run folder: the members it predicts with and its splits."""

    run: RunFolder
    spec: EnsembleSpec  # its ensemble file
    members: tuple[tuple[str, float, tuple[int, ...]], ...]  # (name, weight, folds) in use
    splits: dict
    sha256: str

    @property
    def oof_miou(self) -> float | None:
        """The teacher ensemble's OOF mIoU (the selection's when `select` weighted it)."""
        return self.spec.oof_score

    def strongest_model(self) -> ModelConfig:
        """Architecture and arguments of the member with the best OOF mIoU."""
        from .models.registry import load_config

        by = self.spec.by_name
        name = max((m for m, _, _ in self.members),
                   key=lambda n: (by[n].oof_miou is not None, by[n].oof_miou or 0))
        fold = by[name].folds[0]
        cfg = load_config(self.run.fold_path(name, fold))["model"]
        return ModelConfig(name=cfg["name"], args=dict(cfg.get("args", {})))


def open_teacher(path: str | Path, fp: dict, need_oof: bool = True) -> Teacher:
    """Check a teacher run folder against data fingerprint `fp` (`runfolder.data_fingerprint`):
    its ensemble file, data record (the same train shards), splits and (`need_oof`) every
    out-of-fold file of the members in use. InputError naming the first problem."""
    run = RunFolder(Path(path).resolve())
    spec = run.read_ensemble()
    if run.read_data() is None:
        raise InputError(f"{run.data}: missing; the teacher must be a train-folds run folder "
                         "(its data record proves what it was trained on)")
    run.check_data(fp)
    splits = run.read_splits()
    if splits is None:
        raise InputError(f"{run.splits}: missing; the teacher's folds decide which model may "
                         "teach which image")
    selected = spec.chosen
    members = []
    for m in spec.members:
        if m.name not in selected or m.weight <= 0 or not m.folds:
            continue
        for f in m.folds:
            oof = run.fold_path(m.name, f) / OOF
            if need_oof and not oof.is_file():
                raise InputError(f"{oof}: missing; a teacher needs the out-of-fold predictions "
                                 "that train-folds writes for every fold")
        members.append((m.name, float(m.weight), tuple(f.fold for f in m.folds)))
    if not members:
        raise InputError(f"{run.ensemble}: no selected member with a weight > 0 and folds")
    return Teacher(run, spec, tuple(members), splits, teacher_sha256(spec))


def _fill_labeled(teacher: Teacher, f, ids: np.ndarray) -> int:
    """Write each train image's out-of-fold target; returns how many have none."""
    row = {int(i): r for r, i in enumerate(ids)}
    has = np.zeros(len(ids), bool)
    by_fold = {}
    for name, w, folds in teacher.members:
        for k in folds:
            by_fold.setdefault(k, []).append((name, w))
    for k, members in sorted(by_fold.items()):
        acc, first, wsum = None, None, 0.0
        for name, w in members:
            path = teacher.run.fold_dir(name, k) / OOF
            oof_ids, probs = read_oof(path)
            if first is None:
                first, acc = oof_ids, probs.astype(np.float32) * w
            elif not np.array_equal(oof_ids, first):
                raise InputError(f"{path}: its ids differ from the other members' fold {k}")
            else:
                acc += probs.astype(np.float32) * w
            wsum += w
        try:
            rows = np.array([row[int(i)] for i in first], np.int64)
        except KeyError as e:
            raise InputError(f"{teacher.run.fold_dir(members[0][0], k) / OOF}: id {e} is not in "
                             "the train split of this data") from None
        order = np.argsort(rows, kind="stable")
        f["labeled/probs"][rows[order]] = (acc[order] / wsum).astype(np.float16)
        has[rows] = True
    f["labeled/has"][...] = has
    return int((~has).sum())


def _unlabeled_images(data: Path, split: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, images) of `split`: the images only, never its masks."""
    from .data import stream_batches

    got = list(stream_batches(data, split, batch_size))
    if not got:
        return np.zeros(0, np.int64), np.zeros((0, 64, 128), np.uint8)
    return np.concatenate([b[0] for b in got]), np.concatenate([b[1] for b in got])


def write_targets(teacher: Teacher, data: Path, split, path: Path, *, unlabeled: str,
                  rt: Resolved, dataset_sha256: str, batch_size: int = 32,
                  log: Callable[[str], None] | None = None) -> TargetsRecord:
    """Compute the teacher's targets for the train `split` of `data` and its `unlabeled`
    split ("test" | "none"; the whole ensemble's and the fold-0 models' (`fold_models`:
    InputError when a member has none), `teaching.unlabeled_keys`), and store them at
    `path` (written whole, then renamed). rt: the command's device and precision, the
    teacher's forward runs on."""
    from .ensemble import load_ensemble
    from .inference import PredictConfig, Predictor

    ids_u, images_u = (_unlabeled_images(data, unlabeled, batch_size) if unlabeled != "none"
                       else (np.zeros(0, np.int64), np.zeros((0, 64, 128), np.uint8)))
    cfg = PredictConfig(tta=True, backend="eager", batch_size=batch_size)
    with atomic_path(path) as tmp:
        rec = TargetsRecord(str(teacher.run.path), teacher.sha256, dataset_sha256, unlabeled,
                            len(cfg.views), rt.precision, len(split.ids), 0, len(ids_u),
                            teacher.oof_miou, unlabeled_folds=(0,))
        f = write_targets_file(tmp, rec, split.ids, ids_u, images_u)
        try:
            missing = _fill_labeled(teacher, f, split.ids)
            if len(ids_u):
                # raw softmax, like the out-of-fold targets (a calibration is not in the
                # teacher's sha256, so calibrated targets could also go stale)
                whole = load_ensemble(teacher.run.path, calibrated=False)
                for fold, ens in ((ALL, whole), (0, _fold_ensemble(teacher, whole, 0))):
                    pred = Predictor(ens, cfg, rt)
                    if log:
                        who = "" if fold == ALL else f" fold {fold}"
                        log(f"teacher{who}: {len(pred.models)} models x {len(cfg.views)} views "
                            f"on {len(ids_u)} {unlabeled} images")
                    probs, disagreement = unlabeled_keys(fold)
                    for s in range(0, len(ids_u), batch_size):
                        r = pred(ids_u[s:s + batch_size], images_u[s:s + batch_size],
                                 want_probs=True, want_disagreement=True)
                        f[probs][s:s + len(r.ids)] = r.probs
                        f[disagreement][s:s + len(r.ids)] = r.disagreement
            rec = TargetsRecord(**{**rec.to_json(), "n_without_target": missing,
                                   "unlabeled_folds": (0,)})
            f.attrs["record"] = json.dumps(rec.to_json())
        finally:
            f.close()
    return rec


# --- train-folds --teacher: per-fold pseudo-labels -----------------------------------------


def check_splits(teacher: Teacher, splits: dict) -> None:
    """Refuse (InputError, one line) a teacher whose folds are not the run's `splits`
    (same data: `open_teacher` checked it): k, split seed and every id's fold."""
    t, path = teacher.splits, teacher.run.splits
    why = ("; fold k is taught by the teacher's fold-k models, so they must not have seen its "
           "validation images: train with the teacher's folds (recipe folds and split_seed)")
    if int(t["k"]) != int(splits["k"]):
        raise InputError(f"{path}: the teacher's splits have k={t['k']}, this run's "
                         f"k={splits['k']}{why}")
    if int(t["seed"]) != int(splits["seed"]):
        raise InputError(f"{path}: the teacher's splits have seed {t['seed']}, this run's "
                         f"seed {splits['seed']}{why}")

    def fold_of(s: dict) -> dict[int, int]:
        return {int(i): int(f["fold"]) for f in s["folds"] for i in f["val_ids"]}

    mine, theirs = fold_of(splits), fold_of(t)
    moved = sum(theirs.get(i) != f for i, f in mine.items()) + len(theirs.keys() - mine.keys())
    if moved:
        raise InputError(f"{path}: {moved} image(s) are in another fold than in this run's "
                         f"splits (same k and seed, other assignment){why}")


def _trained_on_all(teacher: Teacher, member: str, entry: FoldSpec) -> bool:
    """A model trained on every image (distill --all, filed under fold number k): never a
    fold model, whatever number it is filed under."""
    every = fold_name(member, ALL).rsplit("/", 1)[1]
    return entry.trained_on == "all" or teacher.run.fold_path(member, entry).name == every


def fold_models(teacher: Teacher, fold: int, why: str | None = None
                ) -> list[tuple[str, float, FoldSpec]]:
    """(member, weight, fold entry) of the teacher's `fold` models: one per member in use,
    weighted as its ensemble file weights the member. InputError naming a member that has
    none (a teacher trained with --folds) or more than one, ending with `why` (default:
    train-folds --teacher's reason and way out)."""
    why = why or (f"fold {fold} of this run is taught by the teacher's fold {fold} models "
                  "only (train the teacher's missing folds, or leave that fold out with --folds)")
    out = []
    for name, weight, _ in teacher.members:
        entries = [f for f in teacher.spec.by_name[name].folds
                   if f.fold == fold and not _trained_on_all(teacher, name, f)]
        if len(entries) != 1:
            what = "no" if not entries else f"{len(entries)}"
            raise InputError(f"{teacher.run.ensemble}: member {name!r} has {what} fold {fold} "
                             f"model(s); {why}")
        out.append((name, weight, entries[0]))
    return out


def taught_folds(teacher: Teacher) -> tuple[int, ...]:
    """The folds of the teacher's splits for which every member in use has a fold model."""
    def complete(k: int) -> bool:
        try:
            return bool(fold_models(teacher, k))
        except InputError:
            return False

    return tuple(k for k in range(int(teacher.splits["k"])) if complete(k))


def _fold_ensemble(teacher: Teacher, loaded, fold: int):
    """The teacher's `fold` models (`fold_models`) out of its `loaded` ensemble (every
    selected model, loaded once), weighted as its ensemble file weights their members."""
    from .ensemble import Ensemble

    by_path = {m.path: m for m in loaded.models}
    plan = fold_models(teacher, fold)
    total = sum(w for _, w, _ in plan)
    return Ensemble(teacher.run.path, [dataclasses.replace(
        by_path[teacher.run.fold_path(n, e)], weight=w / total) for n, w, e in plan])


def write_pseudo_labels(teacher: Teacher, data: Path, path: Path, *, rt: Resolved,
                        dataset_sha256: str, batch_size: int = 32,
                        log: Callable[[str], None] | None = None) -> TargetsRecord:
    """Label the test images once per fold of `taught_folds`: fold k by the teacher's fold-k
    models (`fold_models`) with flip TTA, raw softmax (a calibration is not in the teacher's
    sha256); stored at `path` (written whole, then renamed; the layout: `teaching`).
    rt: the command's device and precision, the teacher's forward runs on."""
    from .ensemble import load_ensemble
    from .inference import PredictConfig, Predictor

    folds = taught_folds(teacher)
    ids, images = _unlabeled_images(data, "test", batch_size)
    cfg = PredictConfig(tta=True, backend="eager", batch_size=batch_size)
    loaded = load_ensemble(teacher.run.path, members=[n for n, _, _ in teacher.members],
                           calibrated=False)
    rec = TargetsRecord(str(teacher.run.path), teacher.sha256, dataset_sha256, "test",
                        len(cfg.views), rt.precision, 0, 0, len(ids), teacher.oof_miou,
                        pseudo_folds=folds)
    with atomic_path(path) as tmp:
        f = write_pseudo_file(tmp, rec, ids, images)
        try:
            for k in folds:
                pred = Predictor(_fold_ensemble(teacher, loaded, k), cfg, rt)
                labels, confidence = pseudo_keys(k)
                if log:
                    log(f"teacher fold {k}: {len(pred.models)} models x {len(cfg.views)} views on "
                        f"{len(ids)} test images")
                for s in range(0, len(ids), batch_size):
                    r = pred(ids[s:s + batch_size], images[s:s + batch_size], want_probs=True)
                    conf = np.take_along_axis(r.probs, r.labels[:, None].astype(np.int64), 1)
                    f[labels][s:s + len(r.ids)] = r.labels
                    f[confidence][s:s + len(r.ids)] = conf[:, 0]
        finally:
            f.close()
    return rec
