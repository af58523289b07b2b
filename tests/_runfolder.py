"""Test helpers for predict/evaluate/report: tiny run folders and datasets built by hand.

A run folder is made with build_model + save_pretrained and a hand-written
ensemble.json (no training), exactly in the layout train-folds writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from marsseg.models.registry import build_model, save_pretrained

TINY = {"base_width": 4, "depth": 2}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_run(run: Path, members=("a", "b"), k: int = 2, seed: int = 0, model: str = "unet",
             args: dict | None = None, weights: dict | None = None, selected=None,
             transform=None, metrics: bool = False) -> Path:
    """Write a run folder with random fold models; `transform(model)` may edit weights
    (a dict {fold: transform}: each fold its own, a fold absent from it left random)."""
    torch.manual_seed(seed)
    entries = []
    for name in members:
        folds = []
        for f in range(k):
            m = build_model(model, **{**TINY, **(args or {})})
            _randomize_bn(m)
            edit = transform.get(f) if isinstance(transform, dict) else transform
            if edit:
                edit(m)
            folder = save_pretrained(m, run / name / f"fold_{f}",
                                     {"member": name, "fold": f, "recipe": "test", "val_miou": 0.5})
            if metrics:
                with open(folder / "metrics.jsonl", "w") as fh:
                    for e in range(3):
                        fh.write(json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1 + f),
                                             "val_loss": 1.2 / (e + 1), "val_miou": 0.3 + 0.1 * e,
                                             "lr": 1e-3}) + "\n")
            (folder / "done.json").write_text(
                json.dumps({"sha256": sha256(folder / "model.safetensors")}))
            folds.append({"fold": f, "path": f"{name}/fold_{f}",
                          "sha256": sha256(folder / "model.safetensors"), "val_miou": 0.5})
        entries.append({"name": name, "weight": (weights or {}).get(name, 1.0), "folds": folds,
                        "oof_miou": 0.5, "oof_iou": [0.0, 0.5, 0.5, 0.5, 0.5]})
    spec = {"format_version": 1, "name": run.name, "recipe": "test", "k": k, "members": entries,
            "oof_miou_ensemble": 0.5, "selected": list(selected or members)}
    (run / "ensemble.json").write_text(json.dumps(spec, indent=2))
    return run


def _randomize_bn(model: torch.nn.Module) -> None:
    # Fresh BN stats (mean 0, var 1) make untrained nets nearly constant; spread them a bit.
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1, generator=g)
            mod.running_var.uniform_(0.5, 1.5, generator=g)


def make_npz(path: Path, n_train: int = 8, n_test: int = 11, seed: int = 0,
             test_masks: bool = False, shape=(64, 128)) -> Path:
    """A tiny npz in the course layout with smooth-ish random images."""
    rng = np.random.default_rng(seed)
    h, w = shape

    def images(n):
        base = rng.integers(0, 256, (n, 1, 1)) + np.linspace(0, 60, w)[None, None, :]
        return np.clip(base + rng.normal(0, 25, (n, h, w)), 0, 255).astype(np.uint8)

    def masks(n):
        m = rng.integers(0, 5, (n, h // 8, w // 8)).repeat(8, 1).repeat(8, 2)
        return m.astype(np.uint8)

    arrays = {"training_set": np.stack([images(n_train), masks(n_train)], 1),
              "test_set": images(n_test)}
    if test_masks:
        arrays["test_masks"] = masks(n_test)
    np.savez(path, **arrays)
    return path


def head_bias(cls: int, value: float = 30.0):
    """A make_run transform: the network predicts class `cls` everywhere."""
    def transform(m):
        with torch.no_grad():
            m.head.bias.zero_()
            m.head.bias[cls] = value
    return transform


def make_teacher(run: Path, shards: Path, k: int = 2, members=("a", "b"), weights=None,
                 in_fold=3, split_seed: int = 0) -> Path:
    """A finished teacher run folder on `shards` (splits: k folds of seed `split_seed`),
    built by hand (no training).

    Its fold models predict class `in_fold` everywhere (what they say on any image, the
    ones they trained on included; a tuple: fold f's models say in_fold[f]; None: random
    models), while the planted out-of-fold files say something else: member 0's fold f
    held out its images as one-hot class 1 + f, member 1's as the uniform distribution.
    So a target tells where it came from.
    """
    from marsseg.data import load_split
    from marsseg.folds import make_splits, splits_dict
    from marsseg.runfolder import RunFolder, data_fingerprint, write_oof

    split = load_split(shards, "train")
    splits = splits_dict(make_splits(split.groups, split.big_rock, k, split_seed), split.ids, k,
                         split_seed)
    transform = (None if in_fold is None else head_bias(in_fold) if isinstance(in_fold, int)
                 else {f: head_bias(c) for f, c in enumerate(in_fold)})
    make_run(run, members=members, k=k, weights=weights, transform=transform)
    rf = RunFolder(run)
    rf.write_splits(splits)
    rf.write_data(data_fingerprint(shards))
    for j, name in enumerate(members):
        for f in range(k):
            ids = np.array(sorted(splits["folds"][f]["val_ids"]), np.int64)
            probs = np.full((len(ids), 5, 64, 128), 0.2, np.float16)
            if j == 0:
                probs[:] = 0
                probs[:, 1 + f % 4] = 1
            write_oof(run / name / f"fold_{f}" / "oof.h5", ids, probs)
    return run


def tta_probs(folders_weights, images: np.ndarray) -> np.ndarray:
    """The weighted flip-TTA softmax (b, 5, H, W) of fold folders on uint8 `images`,
    computed here without the Predictor."""
    from marsseg.models.registry import load_pretrained

    x = torch.from_numpy(images).float()[:, None]
    acc = 0
    for folder, w in folders_weights:
        model = load_pretrained(folder).eval()
        with torch.no_grad():
            p = torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1).flip(-1)
        acc = acc + w * p.numpy() / 2
    return acc / sum(w for _, w in folders_weights)


def make_oof_run(root: Path, shards: Path, members: dict, k: int = 2,
                 n: int | None = None) -> Path:
    """A run folder of ensemble.json and oof.h5 files only (no weights): members maps a name
    to fn(masks, seed) -> probs (b, 5, H, W), over the first ``n`` train images (default:
    all) cut into ``k`` folds; the seed is 10 x the member's index + the fold."""
    import h5py

    from marsseg.data import load_split

    split = load_split(shards, "train")
    parts = np.array_split(np.arange(min(n or len(split.ids), len(split.ids))), k)
    ens = {"format_version": 1, "name": "t", "k": k, "data": str(shards), "members": [],
           "selected": sorted(members)}
    for j, (name, fn) in enumerate(members.items()):
        folds = []
        for f, rows in enumerate(parts):
            d = root / name / f"fold_{f}"
            d.mkdir(parents=True)
            with h5py.File(d / "oof.h5", "w") as h:
                h["ids"] = split.ids[rows]
                h["probs"] = np.asarray(fn(split.masks[rows], 10 * j + f), np.float16)
            folds.append({"fold": f, "path": f"{name}/fold_{f}"})
        ens["members"].append({"name": name, "weight": 1.0, "folds": folds})
    (root / "ensemble.json").write_text(json.dumps(ens))
    return root


#: a valid one-member recipe (2 folds, 1 epoch, the tiniest U-Net)
TINY_RECIPE = """folds = 2
seed = 1
[[members]]
name = "a"
epochs = 1
batch_size = 4
[members.model]
name = "unet"
args = { base_width = 4, depth = 2 }
"""

STUDENT = """seed = 1
[[members]]
name = "student"
epochs = 2
batch_size = 4
[distill]
temperature = 2.0
"""
