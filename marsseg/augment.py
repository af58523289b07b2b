"""Batched, seeded training augmentation: flips, CutMix, big-rock copy-paste, jitter.

Every op takes images float (B, 1, H, W) with pixel values 0..255 and masks
int64 (B, H, W), on any device, and returns new tensors (inputs are not
modified). Randomness comes only from the `generator` argument (a
torch.Generator, on any device): the same generator state gives the same batch.
Small random decisions (which samples, box corners, paste positions) are drawn
on the host from a numpy Generator seeded by one draw from `generator`; the
pixel work runs as whole-batch tensor ops on the batch's device.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

ROCK = 4  # class index of Big Rock


def _rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy Generator seeded from one draw of the torch generator."""
    if generator is None:
        seed = torch.randint(0, 2**62, (1,)).item()
    else:
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()
    return np.random.default_rng(seed)


def _check(images: torch.Tensor, masks: torch.Tensor) -> None:
    if images.ndim != 4 or masks.ndim != 3 or images.shape[:1] + images.shape[2:] != masks.shape:
        raise InputError(f"augment expects images (B,C,H,W) and masks (B,H,W), got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")


def _flip(images, masks, p: float, generator, dim: int, soft=None):
    _check(images, masks)
    if p <= 0:
        return images, masks, soft
    sel = torch.from_numpy(_rng(generator).random(images.shape[0]) < p).to(images.device)
    images = torch.where(sel[:, None, None, None], images.flip(dim), images)
    masks = torch.where(sel[:, None, None], masks.flip(dim - 1), masks)
    if soft is not None:
        soft = torch.where(sel[:, None, None, None], soft.flip(dim), soft)
    return images, masks, soft


def hflip(images: torch.Tensor, masks: torch.Tensor, p: float = 0.5,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each sample left-right with probability p."""
    return _flip(images, masks, p, generator, dim=3)[:2]


def vflip(images: torch.Tensor, masks: torch.Tensor, p: float = 0.5,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each sample top-bottom with probability p (off in recipes by default:
    terrain images have a horizon)."""
    return _flip(images, masks, p, generator, dim=2)[:2]


def cutmix(images: torch.Tensor, masks: torch.Tensor, p: float = 0.5,
           generator: torch.Generator | None = None, alpha: float = 1.0, mode: str = "sample"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019) for segmentation, image and mask pasted together.

    mode "sample": with probability p each sample gets its own box from a random
    other sample. mode "batch" (the paper's code): with probability p the whole
    batch gets one box, taken from a random permutation of the batch.
    Box area fraction is 1 - lam with lam ~ Beta(alpha, alpha), centre uniform,
    clipped at the border (so the area may shrink), as in the paper's code.
    """
    return _cutmix(images, masks, p, generator, alpha, mode)[:2]


def _cutmix(images, masks, p, generator, alpha, mode, soft=None):
    _check(images, masks)
    b, _, h, w = images.shape
    if p <= 0 or b < 2:
        return images, masks, soft
    rng = _rng(generator)
    if mode == "batch":
        sel = np.full(b, rng.random() < p)
        partner = rng.permutation(b)
        lam = np.full(b, rng.beta(alpha, alpha))
        cy, cx = np.full(b, rng.integers(0, h)), np.full(b, rng.integers(0, w))
    else:
        sel = rng.random(b) < p
        # partner: a random other sample (never itself)
        partner = (np.arange(b) + rng.integers(1, b, size=b)) % b
        lam = rng.beta(alpha, alpha, size=b)
        cy, cx = rng.integers(0, h, size=b), rng.integers(0, w, size=b)
    cut = np.sqrt(1.0 - lam)
    ch, cw = (h * cut).astype(np.int64), (w * cut).astype(np.int64)
    y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch - ch // 2, 0, h)
    x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw - cw // 2, 0, w)
    y1 = np.where(sel, y1, y0)  # empty box for unselected samples
    dev = images.device
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)

    def t(a):
        return torch.from_numpy(a).to(dev)

    inside_y = (ys[None] >= t(y0)[:, None]) & (ys[None] < t(y1)[:, None])
    inside_x = (xs[None] >= t(x0)[:, None]) & (xs[None] < t(x1)[:, None])
    box = inside_y[:, :, None] & inside_x[:, None, :]  # (B, H, W)
    idx = t(partner)
    images = torch.where(box[:, None], images[idx], images)
    masks = torch.where(box, masks[idx], masks)
    if soft is not None:
        soft = torch.where(box[:, None], soft[idx], soft)
    return images, masks, soft


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean stack (N, H, W).

    Returns int64 labels, -1 off the mask; each component's label is the flat
    index of one of its pixels. Min-label propagation with pointer jumping
    (no scipy dependency); converges in O(log diameter) sweeps in practice.
    """
    n, h, w = mask.shape
    big = np.iinfo(np.int64).max
    flat_idx = np.arange(mask.size, dtype=np.int64).reshape(mask.shape)
    lab = np.where(mask, flat_idx, big)
    while True:
        new = lab.copy()
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], lab[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], lab[:, :, 1:], out=new[:, :, :-1])
        new = np.where(mask, new, big)
        # pointer jumping: follow label -> that pixel's label
        on = new != big
        new[on] = new.reshape(-1)[new[on]]
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


class RockBank:
    """Big-rock (class 4) crops for copy-paste: per connected component, the
    bounding-box image crop and the component's own pixel mask."""

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray]):
        self.images = images  # uint8 (h, w) each
        self.masks = masks    # bool (h, w) each: which crop pixels are rock
        self.sizes = np.array([int(m.sum()) for m in masks], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_arrays(cls, images, masks, max_crops: int = 512, min_pixels: int = 4) -> RockBank:
        """Collect class-4 components from images uint8 (N, H, W) and masks (N, H, W).

        Keeps the `max_crops` largest components of at least `min_pixels` pixels.
        """
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        if images.ndim == 4:
            images = images[:, 0]
        if images.shape != masks.shape or images.ndim != 3:
            raise InputError(f"RockBank needs images and masks (N,H,W), got "
                             f"{images.shape} and {masks.shape}")
        has = (masks == ROCK).any(axis=(1, 2))
        images, rock = images[has], masks[has] == ROCK
        if not rock.any():
            return cls([], [])
        lab = _components(rock)
        flat = lab.reshape(-1)
        pix = np.flatnonzero(flat >= 0)
        order = np.argsort(flat[pix], kind="stable")
        pix = pix[order]
        starts = np.flatnonzero(np.r_[True, np.diff(flat[pix]) != 0])
        groups = np.split(pix, starts[1:])
        groups = [g for g in groups if g.size >= min_pixels]
        groups.sort(key=lambda g: -g.size)
        _, h, w = rock.shape
        crops_i, crops_m = [], []
        for g in groups[:max_crops]:
            n, yx = np.divmod(g, h * w)
            ys, xs = np.divmod(yx, w)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            m = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            m[ys - y0, xs - x0] = True
            crops_i.append(images[n[0], y0:y1, x0:x1].astype(np.uint8).copy())
            crops_m.append(m)
        return cls(crops_i, crops_m)


def rock_paste(images: torch.Tensor, masks: torch.Tensor, bank: RockBank,
               target_share: float = 0.05, generator: torch.Generator | None = None,
               tolerance: float = 0.005) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste big-rock crops at random places in random batch images until class 4
    covers `target_share` of the batch's pixels.

    A crop is only chosen if it cannot overshoot the target by more than
    `tolerance`; so the final share is in [target, target + tolerance] unless
    the batch already had more, or no crop small enough is left (then it stops
    just short). Crops are mirrored left-right at random.
    """
    _check(images, masks)
    b, _, h, w = images.shape
    if bank is None or len(bank) == 0 or target_share <= 0:
        return images, masks
    rng = _rng(generator)
    is_rock = (masks == ROCK).cpu().numpy()
    total = is_rock.size
    current = int(is_rock.sum())
    goal = target_share * total
    slack = tolerance * total
    hs = np.array([m.shape[0] for m in bank.masks])
    ws = np.array([m.shape[1] for m in bank.masks])
    fits = (hs <= h) & (ws <= w)
    paste_img = np.zeros((b, h, w), dtype=np.uint8)
    paste_m = np.zeros((b, h, w), dtype=bool)
    for _ in range(100_000):  # guard: a pathological batch cannot loop forever
        need = goal - current
        if need <= 0:
            break
        ok = np.flatnonzero(fits & (bank.sizes <= need + slack))
        if ok.size == 0:
            break
        k = int(ok[rng.integers(ok.size)])
        ci, cm = bank.images[k], bank.masks[k]
        if rng.random() < 0.5:
            ci, cm = ci[:, ::-1], cm[:, ::-1]
        ch, cw = cm.shape
        n = int(rng.integers(b))
        y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        region = is_rock[n, y:y + ch, x:x + cw]
        current += int((cm & ~region).sum())
        region |= cm
        pi = paste_img[n, y:y + ch, x:x + cw]
        pi[cm] = ci[cm]
        paste_m[n, y:y + ch, x:x + cw] |= cm
    if not paste_m.any():
        return images, masks
    dev = images.device
    pm = torch.from_numpy(paste_m).to(dev)
    pv = torch.from_numpy(paste_img).to(dev).to(images.dtype)
    images = torch.where(pm[:, None], pv[:, None], images)
    masks = torch.where(pm, torch.full_like(masks, ROCK), masks)
    return images, masks


class RockImages:
    """Every training image holding big rock, with its big-rock pixel mask, for
    `rock_paste_images` (the reference report's class-4 CutMix)."""

    def __init__(self, images: torch.Tensor, rock: torch.Tensor):
        self.images = images  # uint8 (n, H, W)
        self.rock = rock      # bool (n, H, W)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_arrays(cls, images, masks, device: torch.device | str = "cpu") -> RockImages:
        """images uint8 (N, H, W), masks (N, H, W); keeps the images with any class-4 pixel."""
        images = torch.as_tensor(np.asarray(images))
        masks = torch.as_tensor(np.asarray(masks))
        if images.shape != masks.shape or images.ndim != 3:
            raise InputError(f"RockImages needs images and masks (N,H,W), got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        has = (masks == ROCK).flatten(1).any(1)
        return cls(images[has].to(device), (masks[has] == ROCK).to(device))


def rock_paste_images(images: torch.Tensor, masks: torch.Tensor, rocks: RockImages | None,
                      p: float = 0.5, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability p per sample, paste all big-rock pixels of one random image
    of `rocks` at the same position (image and label 4)."""
    _check(images, masks)
    if rocks is None or len(rocks) == 0 or p <= 0:
        return images, masks
    b = images.shape[0]
    rng = _rng(generator)
    sel = torch.from_numpy(rng.random(b) < p).to(images.device)
    src = torch.from_numpy(rng.integers(len(rocks), size=b)).to(rocks.images.device)
    if rocks.rock.shape[1:] != masks.shape[1:]:
        raise InputError(f"rock images are {tuple(rocks.rock.shape[1:])}, batch is "
                         f"{tuple(masks.shape[1:])}")
    m = rocks.rock[src].to(images.device) & sel[:, None, None]
    pix = rocks.images[src].to(images.device, images.dtype)[:, None]
    images = torch.where(m[:, None], pix, images)
    masks = torch.where(m, torch.full_like(masks, ROCK), masks)
    return images, masks


def jitter(images: torch.Tensor, brightness: float = 0.0, contrast: float = 0.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image brightness shift (±brightness × 255) and contrast scale
    (1 ± contrast around the image mean), clamped to 0..255."""
    if brightness <= 0 and contrast <= 0:
        return images
    rng = _rng(generator)
    b = images.shape[0]
    shift = torch.from_numpy(rng.uniform(-brightness, brightness, b) * 255.0)
    scale = torch.from_numpy(rng.uniform(1.0 - contrast, 1.0 + contrast, b))
    shift = shift.to(images.device, images.dtype)[:, None, None, None]
    scale = scale.to(images.device, images.dtype)[:, None, None, None]
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * scale + mean + shift).clamp(0.0, 255.0)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, *,
                  generator: torch.Generator | None, hflip_p: float = 0.5, vflip_p: float = 0.0,
                  cutmix_p: float = 0.0, cutmix_alpha: float = 1.0, cutmix_mode: str = "sample",
                  rock_images: RockImages | None = None, rock_paste_p: float = 0.0,
                  rock_bank: RockBank | None = None, rock_target: float = 0.0,
                  rock_tolerance: float = 0.005, brightness: float = 0.0, contrast: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pipeline: flips, CutMix, whole-image rock paste, big-rock crop
    paste to a share (last of the label ops, so its target holds for the final
    batch), then intensity jitter."""
    images, masks = hflip(images, masks, hflip_p, generator)
    images, masks = vflip(images, masks, vflip_p, generator)
    images, masks = cutmix(images, masks, cutmix_p, generator, cutmix_alpha, cutmix_mode)
    images, masks = rock_paste_images(images, masks, rock_images, rock_paste_p, generator)
    if rock_bank is not None and rock_target > 0:
        images, masks = rock_paste(images, masks, rock_bank, rock_target, generator, rock_tolerance)
    images = jitter(images, brightness, contrast, generator)
    return images, masks


def _rock_soft(images, masks, soft, op):
    """Run a rock paste `op(images, masks)`; pixels it changed get a one-hot Big Rock target
    (weight 1: their label is known)."""
    new_i, new_m = op(images, masks)
    if soft is not None and (new_m is not masks or new_i is not images):
        changed = (new_m != masks) | (new_i != images).any(1)
        rock = torch.zeros_like(soft)
        rock[:, ROCK] = 1.0
        soft = torch.where(changed[:, None], rock, soft)
    return new_i, new_m, soft


def augment_soft(images: torch.Tensor, masks: torch.Tensor, soft: torch.Tensor, cfg, *,
                 generator: torch.Generator | None, rock_images: RockImages | None = None,
                 rock_bank: RockBank | None = None) -> tuple[torch.Tensor, ...]:
    """`augment_batch` with a per-pixel soft target carried along (distillation).

    soft float (B, C, H, W): the teacher's probabilities times a per-pixel weight (all
    zeros: no target). Flips and CutMix move it with the pixels; pixels a rock paste
    changes get a one-hot Big Rock target of weight 1. cfg: the member's AugmentConfig.
    Same ops, order and random draws as `augment_batch`, so images and masks are the
    ones it would give. Returns (images, masks, soft).
    """
    images, masks, soft = _flip(images, masks, cfg.hflip, generator, 3, soft)
    images, masks, soft = _flip(images, masks, cfg.vflip, generator, 2, soft)
    images, masks, soft = _cutmix(images, masks, cfg.cutmix, generator, 1.0, cfg.cutmix_mode, soft)
    images, masks, soft = _rock_soft(images, masks, soft, lambda i, m: rock_paste_images(
        i, m, rock_images, cfg.rock_paste, generator))
    if rock_bank is not None and cfg.rock_target > 0:
        images, masks, soft = _rock_soft(images, masks, soft, lambda i, m: rock_paste(
            i, m, rock_bank, cfg.rock_target, generator))
    images = jitter(images, cfg.brightness, cfg.contrast, generator)
    return images, masks, soft
