"""A fold taught by a teacher: the stored targets file, its streaming loaders, the step's loss.

The targets file (``targets.h5`` in the student's run folder, written once by
`teacher.write_targets`, read only here)::

    labeled/ids i64 (n,)      every train image id      labeled/has bool (n,): has a target
    labeled/probs f16 (n,5,H,W)  the teacher's out-of-fold probabilities (zeros: none)
    unlabeled/ids i64 (m,)    unlabeled/images u8 (m,H,W)
    unlabeled/probs f16 (m,5,H,W)  the teacher's TTA-averaged probabilities
    unlabeled/disagreement f16 (m,H,W)  weighted share of teacher models whose label differs
    unlabeled/fold/<k>/probs, unlabeled/fold/<k>/disagreement   the same by the teacher's
                              fold-k models only, for each k of the record's `unlabeled_folds`
    attrs["record"]           `TargetsRecord` as JSON (teacher sha256, data fingerprint, counts)

The unlabeled targets a fold learns from (`unlabeled_keys`): fold k's are the teacher's fold-k
models' (they never saw fold k's validation images, which pick the student's epoch), fold
"all"'s (no held-out images) the whole ensemble's.

Targets travel as *weighted* probabilities: the teacher's probabilities times a per-pixel
weight w in [0, 1] (w = 0: no target), so augmentation moves the weight with the pixels and
`losses.soft_kl` needs nothing else. Labeled images: w = 1 where the teacher has an
out-of-fold prediction. Unlabeled: `DistillConfig.unlabeled_weighting`. The file stays
open while a fold trains; each batch reads its rows (no copy of the targets in memory).

train-folds --teacher's file (same name, written once by `teacher.write_pseudo_labels`)
holds per-fold pseudo-labels instead; its record's `pseudo_folds` lists the folds, and it
has no labeled/* and no whole-ensemble probabilities::

    unlabeled/ids i64 (m,)    unlabeled/images u8 (m,H,W)
    pseudo/<k>/labels u1 (m,H,W)        the label of the teacher's fold-k models (1..4)
    pseudo/<k>/confidence f16 (m,H,W)   their probability of that label (`pseudo_keys`)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import NUM_CLASSES
from .errors import InputError
from .folds import ALL
from .student import DistillConfig

TARGETS = "targets.h5"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TargetsRecord:
    """What a targets file was made from; a student refuses it when any of this changed."""

    teacher: str  # the teacher's run folder
    teacher_sha256: str  # `teacher.teacher_sha256`: selected members, weights, fold weights
    dataset_sha256: str  # the data's dataset.json (it lists every shard's sha256)
    unlabeled: str  # the split whose images are the unlabeled ones ("test"), or "none"
    views: int  # TTA views of the unlabeled targets
    precision: str  # the teacher's precision for the unlabeled targets
    n_labeled: int  # train images
    n_without_target: int  # train images no teacher fold held out (hard labels only)
    n_unlabeled: int
    teacher_oof_miou: float | None = None
    format_version: int = FORMAT_VERSION
    # train-folds --teacher: the folds whose pseudo-labels the file holds, each made by the
    # teacher's models of that fold only; None: the whole ensemble's targets (distill)
    pseudo_folds: tuple[int, ...] | None = None
    # distill: the folds whose own unlabeled targets the file holds beside the whole
    # ensemble's (`unlabeled_keys`); None: an older file with the whole ensemble's only
    unlabeled_folds: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("pseudo_folds", "unlabeled_folds"):
            if d[key] is None:
                del d[key]
            else:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_json(cls, d: dict) -> TargetsRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or not {"teacher", "teacher_sha256", "dataset_sha256"} <= set(d):
            raise ValueError("no teacher or data fingerprint")
        rec = cls(**{k: v for k, v in d.items() if k in names})
        for key in ("pseudo_folds", "unlabeled_folds"):
            if getattr(rec, key) is not None:
                rec = dataclasses.replace(rec, **{key: tuple(int(k) for k in getattr(rec, key))})
        return rec


@dataclasses.dataclass(frozen=True)
class Teaching:
    """What `train.train_one_fold` needs to teach a fold from stored targets (picklable)."""

    targets: Path  # the targets file
    cfg: DistillConfig


def read_record(path: Path) -> TargetsRecord:
    """The record of a targets file; InputError naming it when unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            rec = TargetsRecord.from_json(json.loads(f.attrs["record"]))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path}: unreadable targets file ({type(e).__name__}); delete it "
                         "to compute the teacher's targets again") from None
    if rec.format_version != FORMAT_VERSION:
        raise InputError(f"{path}: targets format {rec.format_version}, expected {FORMAT_VERSION}")
    return rec


def check_record(path: Path, teacher_sha256: str, dataset_sha256: str, unlabeled: str,
                 per_fold: bool = False) -> TargetsRecord:
    """The stored record, refused (InputError) when the teacher, the data or the unlabeled
    split differ from the ones the targets were made from, or when it is not of the layout
    asked for (`per_fold`: train-folds --teacher's per-fold pseudo-labels)."""
    rec = read_record(path)
    hint = "use a new --out (the stored targets and the student trained on them belong together)"
    if per_fold and rec.pseudo_folds is None:
        raise InputError(f"{path}: pseudo-labels of the teacher's whole ensemble (an older "
                         "layout: its models of the other folds saw each fold's validation "
                         f"images, so its out-of-fold scores are optimistic); {hint}")
    if not per_fold and rec.pseudo_folds is not None:
        raise InputError(f"{path}: per-fold pseudo-labels of train-folds --teacher, not a "
                         f"distillation's targets; {hint}")
    if rec.teacher_sha256 != teacher_sha256:
        raise InputError(f"{path}: made from another teacher ensemble ({rec.teacher}, sha256 "
                         f"{rec.teacher_sha256[:12]}, now {teacher_sha256[:12]}); {hint}")
    if rec.dataset_sha256 != dataset_sha256:
        raise InputError(f"{path}: made from other data (dataset.json sha256 "
                         f"{rec.dataset_sha256[:12]}, now {dataset_sha256[:12]}); {hint}")
    if rec.unlabeled != unlabeled:
        raise InputError(f"{path}: made with --unlabeled {rec.unlabeled}, not {unlabeled}; {hint}")
    if not per_fold and rec.unlabeled != "none" and rec.unlabeled_folds is None:
        raise InputError(f"{path}: unlabeled targets of the teacher's whole ensemble only (an "
                         "older layout: its models of the other folds saw fold 0's validation "
                         f"images, so the student's held-out score is optimistic); {hint}")
    return rec


def write_targets_file(tmp: Path, record: TargetsRecord, labeled_ids: np.ndarray,
                       unlabeled_ids: np.ndarray, unlabeled_images: np.ndarray):
    """Create the datasets (probabilities zero-filled; unlabeled ones for the whole ensemble
    and each fold of `record.unlabeled_folds`) and the record in `tmp`; returns the open
    h5py File for the caller to fill (`labeled/probs`, `labeled/has`, `unlabeled_keys`)."""
    import h5py

    h, w = unlabeled_images.shape[1:] if len(unlabeled_images) else (64, 128)
    f = h5py.File(tmp, "w")
    f.attrs["record"] = json.dumps(record.to_json())
    chunk = (1, NUM_CLASSES, h, w)
    f.create_dataset("labeled/ids", data=np.asarray(labeled_ids, np.int64))
    f.create_dataset("labeled/has", data=np.zeros(len(labeled_ids), bool))
    f.create_dataset("labeled/probs", (len(labeled_ids), NUM_CLASSES, h, w), "f2",
                     chunks=chunk if len(labeled_ids) else None)
    m = len(unlabeled_ids)
    f.create_dataset("unlabeled/ids", data=np.asarray(unlabeled_ids, np.int64))
    f.create_dataset("unlabeled/images", data=unlabeled_images.astype(np.uint8))
    for fold in (ALL, *(record.unlabeled_folds or ())):
        probs, disagreement = unlabeled_keys(fold)
        f.create_dataset(probs, (m, NUM_CLASSES, h, w), "f2", chunks=chunk if m else None)
        f.create_dataset(disagreement, (m, h, w), "f2", chunks=(1, h, w) if m else None)
    return f


def unlabeled_keys(fold: int | str) -> tuple[str, str]:
    """The datasets of the unlabeled targets fold `fold` learns from: (probs, disagreement);
    fold "all" (`folds.ALL`): the whole ensemble's."""
    base = "unlabeled" if fold == ALL else f"unlabeled/fold/{int(fold)}"
    return f"{base}/probs", f"{base}/disagreement"


def pseudo_keys(fold: int) -> tuple[str, str]:
    """The datasets of fold `fold`'s pseudo-labels: (labels, confidence)."""
    return f"pseudo/{int(fold)}/labels", f"pseudo/{int(fold)}/confidence"


def write_pseudo_file(tmp: Path, record: TargetsRecord, unlabeled_ids: np.ndarray,
                      unlabeled_images: np.ndarray):
    """Create a per-fold pseudo-label file (`record.pseudo_folds`; labels and confidences
    zero-filled, compressed) in `tmp`; returns the open h5py File for the caller to fill."""
    import h5py

    m, (h, w) = len(unlabeled_ids), unlabeled_images.shape[1:]
    f = h5py.File(tmp, "w")
    f.attrs["record"] = json.dumps(record.to_json())
    f.create_dataset("unlabeled/ids", data=np.asarray(unlabeled_ids, np.int64))
    f.create_dataset("unlabeled/images", data=unlabeled_images.astype(np.uint8))
    # one chunk per image; gzip + shuffle: labels are blobs, confidences mostly near 1
    opts = {"chunks": (1, h, w), "compression": "gzip", "shuffle": True} if m else {}
    for k in record.pseudo_folds:
        labels, confidence = pseudo_keys(k)
        f.create_dataset(labels, (m, h, w), "u1", **opts)
        f.create_dataset(confidence, (m, h, w), "f2", **opts)
    return f


def with_pseudo_labels(train: tuple[np.ndarray, np.ndarray], path: Path | None, fold: int,
                       threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """A fold's training (images, masks) plus the unlabeled images of a per-fold pseudo-label
    file with the labels of the teacher's `fold` models: their label (classes 1..4, as
    submitted) where its probability is at least `threshold`, else 0 (a loss with
    ignore_background ignores it). `path` None: `train` as it is."""
    import h5py

    if path is None:
        return train
    try:
        with h5py.File(path, "r") as f:
            images = f["unlabeled/images"][()]
            labels, confidence = pseudo_keys(fold)
            conf = f[confidence][()].astype(np.float32)
            masks = np.where(conf >= threshold, f[labels][()], 0).astype(np.uint8)
    except (OSError, KeyError) as e:
        raise InputError(f"{path}: no pseudo-labels of fold {fold} ({e}); use a new --out") \
            from None
    return np.concatenate([train[0], images]), np.concatenate([train[1], masks])


# --- streaming ---------------------------------------------------------------------------------


class _Streamed(Dataset):
    """uint8 images and masks in memory; each image's weighted target read from the file."""

    def __init__(self, images, masks, rows: np.ndarray, probs, weight):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.masks = torch.from_numpy(np.ascontiguousarray(masks))
        self.rows, self.probs, self.weight = rows, probs, weight

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return tuple(t[0] for t in self.__getitems__([i]))

    def __getitems__(self, idx: list[int]):
        idx = np.asarray(idx, np.int64)
        rows = self.rows[idx]
        soft = np.zeros((len(idx), *self.probs.shape[1:]), np.float32)
        ok = np.flatnonzero(rows >= 0)
        if ok.size:
            order = np.argsort(rows[ok], kind="stable")
            soft[ok[order]] = self.probs[rows[ok][order]]  # h5py reads increasing rows
            if self.weight is not None:
                soft[ok[order]] *= self.weight(rows[ok][order], soft[ok[order]])[:, None]
        t = torch.as_tensor(idx)
        return self.images[t], self.masks[t], torch.from_numpy(soft)


def _whole_batch(batch):
    return batch  # _Streamed.__getitems__ already returns whole batches


class Taught:
    """The teacher's targets for one fold: its training loader, the unlabeled stream, the loss.

    Open with `Taught.open`; `close` when the fold is finished.
    """

    def __init__(self, path: Path, cfg: DistillConfig):
        import h5py

        self.path, self.cfg = Path(path), cfg
        self.record = read_record(self.path)
        try:
            self.file = h5py.File(self.path, "r")
            self.labeled_ids = self.file["labeled/ids"][()]
            self.has = self.file["labeled/has"][()]
            self.unlabeled_ids = self.file["unlabeled/ids"][()]
        except (OSError, KeyError) as e:
            raise InputError(f"{self.path}: unreadable targets file ({e})") from None
        self._gen = torch.Generator()
        self._disagreement = unlabeled_keys(ALL)[1]  # of the fold's unlabeled targets
        self._unlabeled: DataLoader | None = None
        self._iter = None
        self.device = torch.device("cpu")

    def close(self) -> None:
        self.file.close()

    def train_loader(self, images, masks, ids, batch_size: int, gen: torch.Generator) -> DataLoader:
        """Batches (images u8, masks u8, weighted targets f32 (b,5,H,W)) of the fold's training
        rows; images without a teacher target get an all-zero one (hard labels only)."""
        row = {int(i): r for r, i in enumerate(self.labeled_ids)}
        try:
            rows = np.array([row[int(i)] if self.has[row[int(i)]] else -1 for i in ids], np.int64)
        except KeyError as e:
            raise InputError(f"{self.path}: no target row for train id {e}; not the targets "
                             "of this data") from None
        drop_last = len(images) > batch_size  # as the plain loader: no 1-image BN batches
        return DataLoader(_Streamed(images, masks, rows, self.file["labeled/probs"], None),
                          batch_size=batch_size, shuffle=True, generator=gen, drop_last=drop_last,
                          collate_fn=_whole_batch)

    def open_unlabeled(self, n_labeled: int, batch_size: int, device, fold: int | str) -> int:
        """Set up the unlabeled stream of fold `fold` (`unlabeled_keys`; none when the file
        has no unlabeled images); returns its batch size (0: none)."""
        self.device = torch.device(device)
        m = len(self.unlabeled_ids)
        if m == 0 or self.cfg.unlabeled_weight == 0:
            return 0
        if fold != ALL and int(fold) not in (self.record.unlabeled_folds or ()):
            raise InputError(f"{self.path}: no unlabeled targets of the teacher's fold {fold} "
                             "models (only the whole ensemble's, which saw fold "
                             f"{fold}'s validation images); use a new --out")
        probs, self._disagreement = unlabeled_keys(fold)
        ub = self.cfg.unlabeled_batch_size or math.ceil(batch_size * m / max(1, n_labeled))
        ub = max(1, min(ub, m))
        images = self.file["unlabeled/images"][()]
        ds = _Streamed(images, np.zeros_like(images), np.arange(m, dtype=np.int64),
                       self.file[probs], self._unlabeled_weight)
        self._unlabeled = DataLoader(ds, batch_size=ub, shuffle=True, generator=self._gen,
                                     collate_fn=_whole_batch)
        return ub

    def _unlabeled_weight(self, rows: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per-pixel weight (b,H,W) of unlabeled targets (rows increasing)."""
        if self.cfg.unlabeled_weighting == "confidence":
            return probs.max(1)
        dis = self.file[self._disagreement][rows].astype(np.float32)
        return (dis <= self.cfg.max_disagreement + 1e-3).astype(np.float32)  # f16 rounding

    def start_epoch(self, seed: int) -> None:
        """Seed the unlabeled shuffle of an epoch and start its pass over again."""
        self._gen.manual_seed((seed * 2654435761 + 97) & 0x7FFFFFFF)
        self._iter = None

    def next_unlabeled(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next unlabeled batch (images u8 (b,H,W), weighted targets) on the device,
        cycling through the unlabeled images; None without unlabeled images."""
        if self._unlabeled is None:
            return None
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self._unlabeled)
            try:
                images, _, soft = next(self._iter)
                return images.to(self.device), soft.to(self.device)
            except StopIteration:
                self._iter = None
        raise InputError(f"{self.path}: the unlabeled images give no batch")

    def loss(self, model, loss_fn, augment_cfg, generator, images, masks, soft, *,
             rock_images=None, rock_bank=None) -> torch.Tensor:
        """One step's loss: the member's loss on the labeled masks, KL to the labeled targets,
        and KL to an unlabeled batch's targets (one forward pass over both batches).

        images/masks uint8 (B,H,W), soft f32 (B,5,H,W) on the device.
        """
        from .augment import augment_soft
        from .losses import soft_kl

        c = self.cfg
        x, y, q = augment_soft(images.unsqueeze(1).float(), masks.long(), soft.float(),
                               augment_cfg, generator=generator, rock_images=rock_images,
                               rock_bank=rock_bank)
        n = len(y)
        unl = self.next_unlabeled()
        if unl is not None:  # flips and CutMix; rock paste only into labeled images
            ui, us = unl
            xu, _, qu = augment_soft(ui.unsqueeze(1).float(), torch.zeros_like(ui).long(),
                                     us.float(), augment_cfg, generator=generator)
            x = torch.cat([x, xu])
        out = model(x.contiguous(memory_format=torch.channels_last))
        heads = out if isinstance(out, (list, tuple)) else [out]
        loss = heads[0].new_zeros((), dtype=torch.float32)
        if c.hard_weight > 0:
            lab = [h[:n] for h in heads] if isinstance(out, (list, tuple)) else heads[0][:n]
            loss = loss + c.hard_weight * loss_fn(lab, y)
        if c.soft_weight > 0:
            loss = loss + c.soft_weight * soft_kl(heads[0][:n], q, c.temperature)
        if unl is not None:
            loss = loss + c.unlabeled_weight * soft_kl(heads[0][n:], qu, c.temperature)
        return loss
