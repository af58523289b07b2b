"""Procedural Mars-like terrain in the course npz layout: the embedded default data set.

Each synthetic *scene* is a 128x128 view cut into two 64x128 bands (top = far, often
with sky; bottom = near, sometimes with rover hardware), like real_mars.npz. Regions of
soil, bedrock and sand come from smooth random fields with horizon-like horizontal
structure. Their textures overlap in brightness (per-scene offsets, brightness and
contrast jitter), so no single threshold separates them: soil is fine grain with
pebbles, bedrock is blocky and cracked, sand is rippled. Big rocks are rare bright
blobs with a shadow (about 0.3% of pixels). Sky, rover parts and occasional
unlabeled patches are class 0. A group of "alien" outliers shares one identical mask
that does not match their images, like the course file's 110.

Everything is numpy, deterministic per seed, and fast (hundreds of images per second).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._io import atomic_path
from .errors import InputError

H, W = 64, 128  # one band
SCENE_H = 2 * H  # a scene is two bands stacked


def default_n_outliers(n_train: int) -> int:
    """Outlier group size used when none is given: 5% of the file, at least 12, at most 110."""
    if n_train < 48:
        return 0
    return int(min(110, max(12, n_train // 20)))


def _interp(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation matrix: upsampling a grid is two matmuls."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] += frac
    return m


_INTERP_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _smooth(rng: np.random.Generator, gh: int, gw: int, h: int = SCENE_H, w: int = W) -> np.ndarray:
    """Smooth random field (h, w) with unit-ish amplitude from a (gh, gw) grid of normals."""
    key_r, key_c = (h, gh), (w, gw)
    if key_r not in _INTERP_CACHE:
        _INTERP_CACHE[key_r] = _interp(h, gh)
    if key_c not in _INTERP_CACHE:
        _INTERP_CACHE[key_c] = _interp(w, gw)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return _INTERP_CACHE[key_r] @ grid @ _INTERP_CACHE[key_c].T


_YY, _XX = np.mgrid[0:SCENE_H, 0:W].astype(np.float32)


def _regions(rng: np.random.Generator) -> np.ndarray:
    """Labels 1..3 (soil, bedrock, sand) for one scene (128, 128)."""
    row = _YY / SCENE_H
    # Elongated horizontally (coarser in x) so regions look like receding terrain strata.
    f_soil = _smooth(rng, 6, 3) + rng.normal(0.3, 0.6)
    f_bed = _smooth(rng, 6, 4) + rng.normal(0.0, 0.6) + rng.normal(0.0, 0.8) * (row - 0.5)
    period = rng.uniform(0.35, 0.9)
    f_sand = (
        _smooth(rng, 5, 3)
        + rng.normal(-0.2, 0.6)
        + 0.7 * np.sin(2 * np.pi * row / period + rng.uniform(0, 2 * np.pi))
    )
    return (np.argmax(np.stack([f_soil, f_bed, f_sand]), axis=0) + 1).astype(np.uint8)


def _textures(rng: np.random.Generator) -> np.ndarray:
    """Zero-mean texture per class, stacked (3, 128, 128): soil, bedrock, sand."""
    shape = (SCENE_H, W)
    # Soil: fine grain, some pebbles (small rocks are soil, not big rock), gentle shading.
    soil = rng.normal(0.0, 9.0, shape).astype(np.float32) + 5.0 * _smooth(rng, 16, 16)
    pebbles = rng.random(shape) < 0.015
    soil[pebbles] += rng.uniform(15, 35)
    soil[np.roll(pebbles, 1, axis=0)] -= 10.0  # their shadow below
    # Bedrock: flat blocks of random size with dark cracks between them.
    b = int(rng.integers(5, 10))
    blocks = rng.normal(0.0, 11.0, (SCENE_H // b + 2, W // b + 2)).astype(np.float32)
    oy, ox = rng.integers(0, b, 2)
    bed = np.repeat(np.repeat(blocks, b, 0), b, 1)[oy : oy + SCENE_H, ox : ox + W]
    crack = np.abs(_smooth(rng, 14, 20)) < 0.08
    bed = bed + rng.normal(0.0, 3.0, shape).astype(np.float32) - 30.0 * crack
    # Sand: ripples with a wavelength that grows towards the viewer, little grain.
    theta = rng.normal(0.0, 0.35)
    lam = rng.uniform(5.0, 9.0) * (0.6 + 0.8 * _YY / SCENE_H)
    warp = 2.5 * _smooth(rng, 4, 6)
    phase = (_XX * np.sin(theta) + _YY * np.cos(theta) + warp) / lam
    sand = 11.0 * np.sin(2 * np.pi * phase) + rng.normal(0.0, 2.5, shape).astype(np.float32)
    return np.stack([soil, bed, sand])


def _ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((_YY - cy) / ry) ** 2 + ((_XX - cx) / rx) ** 2 <= 1.0


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One 128x128 scene: (image float32 brightness, mask uint8)."""
    mask = _regions(rng)
    tex = _textures(rng)
    # Per-scene class offsets overlap: bedrock is a little brighter and sand darker on
    # average, but the spread is larger than the gap.
    offsets = np.array([0.0, rng.normal(5, 7), rng.normal(-4, 7)], dtype=np.float32)
    rel = np.take_along_axis(tex, (mask[None] - 1).astype(np.intp), 0)[0] + offsets[mask - 1]
    rel += 8.0 * _smooth(rng, 3, 4)  # illumination

    # Big rocks: rare bright blobs with a dark shadow on the down-sun side.
    for _ in range(rng.poisson(0.35)):
        rx = rng.uniform(3.5, 10.0)
        ry = rx * rng.uniform(0.55, 0.9)
        cy, cx = rng.uniform(20, SCENE_H - 4), rng.uniform(4, W - 4)
        sdx, sdy = rng.choice([-1, 1]) * 0.6 * rx, 0.5 * ry
        shadow = _ellipse(cy + sdy, cx + sdx, ry * 1.05, rx * 1.1)
        rock = _ellipse(cy, cx, ry, rx)
        rel[shadow & ~rock] -= rng.uniform(25, 40)
        shade = (_YY - cy) / ry * 8.0 + (_XX - cx) / rx * -sdx / rx * 6.0
        rel[rock] = rng.uniform(22, 45) + shade[rock] + rng.normal(0, 4, int(rock.sum()))
        mask[rock] = 4

    # Sky above a wobbly horizon in the top band (unlabeled).
    u = rng.random()
    if u < 0.45:
        horizon = rng.uniform(8, 40) if u > 0.05 else rng.uniform(56, 62)  # a few near-empty bands
        line = horizon + 3.0 * _smooth(rng, 2, 6)[0] + 1.5 * np.sin(_XX[0] / rng.uniform(6, 15))
        sky = _YY < line[None, :]
        rel[sky] = (
            rng.normal(12, 8)
            - 10.0 * (_YY[sky] / max(horizon, 1.0))
            + rng.normal(0, 1.2, int(sky.sum()))
        )
        mask[sky] = 0
    # Rover hardware in the bottom band: dark body with bright edges, a wheel (unlabeled).
    if rng.random() < 0.25:
        side = rng.random() < 0.5
        x0 = rng.uniform(0, 50) if side else rng.uniform(W - 50, W)
        top = rng.uniform(SCENE_H - 40, SCENE_H - 12)
        body = (_YY > top) & ((_XX < x0) if side else (_XX > x0))
        body |= _ellipse(
            rng.uniform(SCENE_H - 12, SCENE_H), x0, rng.uniform(8, 14), rng.uniform(8, 14)
        )
        edge = body & ~np.roll(body, 2, axis=0)
        # Hardware is far darker or brighter than terrain, with panel seams and a lit rim.
        tone = rng.choice([-45.0, 70.0]) + rng.normal(0, 6)
        seams = (np.abs(np.sin(_XX[body] / 5.0)) < 0.15) | (np.abs(np.sin(_YY[body] / 4.0)) < 0.15)
        rel[body] = tone - 25.0 * np.sign(tone) * seams
        rel[edge] = 80.0
        mask[body] = 0
    # Unlabeled patch, like gaps in crowd-sourced polygons.
    if rng.random() < 0.08:
        y0, x0 = rng.integers(0, SCENE_H - 20), rng.integers(0, W - 30)
        mask[y0 : y0 + rng.integers(10, 40), x0 : x0 + rng.integers(15, 60)] = 0

    # NAVCAM-like dark exposure with brightness and contrast jitter (mean about 60/255).
    mean = float(np.clip(rng.lognormal(np.log(60), 0.3), 20, 150))
    contrast = rng.uniform(0.6, 1.5)
    img = mean + contrast * rel
    return img, mask


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _bands(rng: np.random.Generator, n: int, prefix: str):
    """n bands from as many scenes as needed; 60% of scenes give both bands (one group)."""
    images = np.empty((n, H, W), np.uint8)
    masks = np.empty((n, H, W), np.uint8)
    sources: list[str] = []
    scene = 0
    while len(sources) < n:
        img, mask = _scene(rng)
        keep = [0, 1] if rng.random() < 0.6 else [int(rng.integers(0, 2))]
        for band in keep:
            if len(sources) == n:
                break
            i = len(sources)
            images[i] = _to_u8(img[band * H : (band + 1) * H])
            masks[i] = mask[band * H : (band + 1) * H]
            sources.append(f"{prefix}{scene:05d}#{band}")
        scene += 1
    return images, masks, sources


def _alien_mask(rng: np.random.Generator) -> np.ndarray:
    """One fixed multi-class mask shared by every outlier (blocky, unlike real terrain)."""
    m = np.ones((H, W), np.uint8)
    m[:, W // 3 : 2 * W // 3] = 2
    m[H // 2 :, : W // 2] = 3
    cy, cx = rng.integers(16, 48), rng.integers(30, 98)
    m[cy - 6 : cy + 6, cx - 10 : cx + 10] = 4
    m[: rng.integers(4, 12)] = 0
    return m


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(n_train: int, n_test: int) -> None:
    """The whole set is built in memory (images, masks, the stacked copy, the names):
    refuse with one line a count this machine cannot hold, before allocating any of it."""
    need = (n_train + n_test) * (4 * H * W + 256)
    have = _available_memory()
    if have is not None and need > have:
        raise InputError(f"--n-train {n_train} --n-test {n_test}: needs about "
                         f"{need / 2**30:,.1f} GiB of memory, {have / 2**30:,.1f} GiB are "
                         "available; ask for fewer images")


def make_synthetic(
    n_train: int, n_test: int, seed: int = 0, n_outliers: int | None = None
) -> dict[str, np.ndarray]:
    """Arrays in the course npz layout plus `test_masks` and `training_source`/`test_source`.

    training_set: uint8 (n_train, 2, 64, 128) ([:,0] image, [:,1] mask 0..4);
    test_set, test_masks: uint8 (n_test, 64, 128). `n_outliers` training rows (default
    `default_n_outliers(n_train)`) share one identical mask that does not fit their image.
    """
    if n_train < 1:
        raise InputError(f"--n-train must be at least 1 (got {n_train})")
    if n_test < 1:
        raise InputError(f"--n-test must be at least 1 (got {n_test}); prepare needs test images")
    if seed < 0:
        raise InputError(f"--seed must be >= 0 (got {seed})")
    if n_outliers is None:
        n_outliers = default_n_outliers(n_train)
    if not 0 <= n_outliers <= n_train:
        raise InputError(f"--n-outliers must be between 0 and n-train={n_train} (got {n_outliers})")
    _check_memory(n_train, n_test)
    rng = np.random.default_rng(seed)
    tr_img, tr_mask, tr_src = _bands(rng, n_train, f"synth{seed}-")
    te_img, te_mask, te_src = _bands(rng, n_test, f"synth{seed}-test-")
    if n_outliers:
        rows = np.sort(rng.choice(n_train, n_outliers, replace=False))
        alien = _alien_mask(rng)
        tr_mask[rows] = alien
        for k, r in enumerate(rows):  # an outlier is a lone band of its own scene
            tr_src[r] = f"synth{seed}-alien-{k:04d}#0"
    return {
        "training_set": np.stack([tr_img, tr_mask], axis=1),
        "test_set": te_img,
        "test_masks": te_mask,
        "training_source": np.array(tr_src, dtype=str),
        "test_source": np.array(te_src, dtype=str),
    }


def write_synthetic(
    path: Path, n_train: int, n_test: int, seed: int = 0, n_outliers: int | None = None
) -> dict[str, np.ndarray]:
    """Generate and save to `path` (uncompressed npz, written to a temp name then renamed)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an output .npz file name")
    arrays = make_synthetic(n_train, n_test, seed, n_outliers)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object keeps numpy from appending ".npz"
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e})") from None
    return arrays
