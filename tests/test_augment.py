"""Augmentation properties (hypothesis) and hand-made RockBank cases.

Images encode their own mask (pixel = 40 * label + 10), so any op that moves
image pixels without their labels (or the other way round) is caught.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marsseg.augment import (
    RockBank,
    RockImages,
    _components,
    augment_batch,
    cutmix,
    hflip,
    jitter,
    rock_paste,
    rock_paste_images,
    vflip,
)
from marsseg.config import AugmentConfig

FEW = settings(max_examples=20, deadline=None)
H, W = 16, 32


def encode(masks: np.ndarray) -> np.ndarray:
    return (masks.astype(np.int64) * 40 + 10).astype(np.uint8)


def random_masks(seed: int, n: int, rock_p: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 4, (n, H, W))
    # blocky terrain: upsample a coarse label map so regions are contiguous
    masks = np.repeat(np.repeat(masks[:, ::4, ::4], 4, 1), 4, 2)[:, :H, :W]
    masks[rng.random((n, H, W)) < rock_p] = 4
    return masks.astype(np.uint8)


def make_bank(seed: int) -> RockBank:
    masks = random_masks(seed + 1, 8, rock_p=0.0)
    rng = np.random.default_rng(seed)
    for i in range(8):  # rocks of 1..12 pixels, some single pixels
        h, w = rng.integers(1, 4), rng.integers(1, 5)
        y, x = rng.integers(0, H - h), rng.integers(0, W - w)
        masks[i, y:y + h, x:x + w] = 4
        masks[i, rng.integers(0, H), rng.integers(0, W)] = 4
    return RockBank.from_arrays(encode(masks), masks, min_pixels=1)


def batch(seed: int, b: int):
    m = random_masks(seed, b)
    return torch.from_numpy(encode(m))[:, None].float(), torch.from_numpy(m).long()


def assert_aligned(images: torch.Tensor, masks: torch.Tensor) -> None:
    assert images.shape[1] == 1 and images.shape[0] == masks.shape[0]
    assert masks.dtype == torch.int64
    assert int(masks.min()) >= 0 and int(masks.max()) <= 4
    torch.testing.assert_close(images[:, 0], (masks * 40 + 10).float(), rtol=0, atol=0)


OPS = st.fixed_dictionaries({
    "hflip": st.sampled_from([0.0, 0.5, 1.0]),
    "vflip": st.sampled_from([0.0, 0.5, 1.0]),
    "cutmix": st.sampled_from([0.0, 0.5, 1.0]),
    "cutmix_mode": st.sampled_from(["batch", "sample"]),
    "rock_target": st.sampled_from([0.0, 0.03, 0.1]),
})


@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 5), ops=OPS)
def test_labels_in_range_and_image_mask_aligned(seed, b, ops):
    images, masks = batch(seed, b)
    g = torch.Generator().manual_seed(seed)
    out_i, out_m = augment_batch(images, masks, AugmentConfig(**ops), generator=g,
                                 rock_bank=make_bank(seed))
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    assert_aligned(out_i, out_m)


@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(2, 5), ops=OPS)
def test_same_seed_same_batch(seed, b, ops):
    images, masks = batch(seed, b)
    bank = make_bank(seed)
    cfg = AugmentConfig(brightness=0.1, contrast=0.2, **ops)
    runs = [augment_batch(images, masks, cfg, generator=torch.Generator().manual_seed(seed),
                          rock_bank=bank) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # inputs are not modified in place
    assert_aligned(images, masks)


@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 6),
       target=st.floats(0.005, 0.25), tol=st.sampled_from([0.005, 0.01, 0.02]))
def test_rock_share_reaches_target_within_tolerance(seed, b, target, tol):
    images, masks = batch(seed, b)
    bank = make_bank(seed)
    assert bank.sizes.min() == 1  # some crop always fits the remaining need
    before = float((masks == 4).float().mean())
    out_i, out_m = rock_paste(images, masks, bank, target, torch.Generator().manual_seed(seed),
                              tolerance=tol)
    after = float((out_m == 4).float().mean())
    assert_aligned(out_i, out_m)
    if before >= target:
        assert after == before
    else:
        assert target <= after <= target + tol + 1e-9
    # pasting only adds rock: every original rock pixel stays rock
    assert bool((out_m[masks == 4] == 4).all())


@FEW
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(2, 5), alpha=st.sampled_from([0.5, 1.0, 2.0]))
def test_cutmix_pixels_come_from_the_same_place_in_the_batch(seed, b, alpha):
    # tag each sample so the source of every pixel is known: image = 10 * sample + label
    masks = torch.from_numpy(random_masks(seed, b)).long()
    images = (torch.arange(b)[:, None, None] * 10 + masks).float()[:, None]
    out_i, out_m = cutmix(images, masks, 1.0, torch.Generator().manual_seed(seed), alpha)
    src = (out_i[:, 0] // 10).long()
    assert bool((out_i[:, 0] % 10 == out_m).all())  # label travelled with its pixel
    assert bool((masks.gather(0, src) == out_m).all())  # same position in the source
    # each source box is one axis-aligned rectangle
    for n in range(b):
        ys, xs = torch.nonzero(src[n] != n, as_tuple=True)
        if ys.numel():
            area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert int(area) == ys.numel()


@FEW
@given(seed=st.integers(0, 2**31 - 1))
def test_components_match_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    grid = rng.random((2, 9, 13)) < rng.uniform(0.2, 0.7)
    lab = _components(grid)
    expected = []
    seen = np.zeros_like(grid)
    for n, y0, x0 in zip(*np.nonzero(grid), strict=True):
        if seen[n, y0, x0]:
            continue
        comp, q = [], deque([(y0, x0)])
        seen[n, y0, x0] = True
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < 9 and 0 <= xx < 13 and grid[n, yy, xx] and not seen[n, yy, xx]:
                    seen[n, yy, xx] = True
                    q.append((yy, xx))
        expected.append(sorted(comp))
        labels = {lab[n, y, x] for y, x in comp}
        assert len(labels) == 1 and -1 not in labels
    assert len(np.unique(lab[lab >= 0])) == len(expected)


def test_rock_bank_by_hand():
    m = np.zeros((2, 6, 8), dtype=np.uint8)
    m[0, 1:3, 1:3] = 4            # 2x2 square: 4 pixels
    m[0, 4, 5] = m[0, 5, 5] = 4   # vertical pair: 2 pixels
    m[0, 5, 6] = 4                # touches the pair: L of 3 pixels
    m[1, 0, 0] = m[1, 1, 1] = 4   # diagonal: two separate 1-pixel rocks (4-connected)
    m[1, 3:6, 2:7] = 2            # other classes are not rock
    img = encode(m)
    bank = RockBank.from_arrays(img, m, min_pixels=1)
    assert sorted(bank.sizes.tolist(), reverse=True) == [4, 3, 1, 1]
    assert bank.sizes.tolist()[:2] == [4, 3]  # largest first
    ell = bank.masks[1]
    np.testing.assert_array_equal(ell, [[True, False], [True, True]])
    assert (bank.images[1][ell] == 170).all()
    assert len(RockBank.from_arrays(img, m, min_pixels=2)) == 2
    assert len(RockBank.from_arrays(img, m, max_crops=1, min_pixels=1)) == 1
    empty = RockBank.from_arrays(img, np.zeros_like(m))
    assert len(empty) == 0
    x, y = torch.from_numpy(img)[:, None].float(), torch.from_numpy(m).long()
    same = rock_paste(x, y, empty, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(same[0], x) and torch.equal(same[1], y)


def test_flips_by_hand():
    m = torch.tensor([[[0, 1, 2], [3, 4, 0]]])
    x = (m * 40 + 10).float()[:, None]
    g = torch.Generator().manual_seed(0)
    xi, mi = hflip(x, m, 1.0, g)
    assert mi.tolist() == [[[2, 1, 0], [0, 4, 3]]]
    assert_aligned(xi, mi)
    xi, mi = vflip(x, m, 1.0, g)
    assert mi.tolist() == [[[3, 4, 0], [0, 1, 2]]]
    assert torch.equal(hflip(x, m, 0.0, g)[1], m)


def test_augment_batch_defaults_are_the_recipe_defaults():
    import inspect

    assert inspect.signature(augment_batch).parameters["cfg"].default == AugmentConfig()


def test_default_pipeline_never_flips_vertically():
    # each row has one label: any horizontal flip leaves it, a vertical one would not
    m = torch.arange(4).repeat_interleave(8).reshape(1, 4, 8).repeat(6, 1, 1)
    x = (m * 40 + 10).float()[:, None]
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        xi, mi = augment_batch(x, m, generator=g)
        assert torch.equal(mi, m) and torch.equal(xi, x)


def test_jitter_stays_in_range_and_keeps_masks():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 4, 4) * 255
    m = torch.randint(0, 5, (8, 4, 4))
    g = torch.Generator().manual_seed(0)
    xi, mi = augment_batch(x, m, AugmentConfig(brightness=0.5, contrast=0.5), generator=g)
    assert torch.equal(mi, m)
    assert float(xi.min()) >= 0.0 and float(xi.max()) <= 255.0
    assert not torch.equal(xi, x)
    assert torch.equal(jitter(x), x)


@pytest.mark.parametrize("bad", [(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)),
                                 (torch.zeros(2, 1, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long))])
def test_shape_errors(bad):
    from marsseg.errors import InputError
    with pytest.raises(InputError, match="augment expects"):
        hflip(*bad, 0.5, torch.Generator())


@FEW
@given(st.integers(0, 10_000))
def test_cutmix_batch_mode_one_box_for_all(seed):
    x, y = batch(seed, 6)
    g = torch.Generator().manual_seed(seed)
    x2, y2 = cutmix(x, y, p=1.0, generator=g, mode="batch")
    changed = (x2[:, 0] != x[:, 0]) | (y2 != y)
    assert torch.equal(x2[:, 0], torch.from_numpy(encode(y2.numpy())).float())  # still aligned
    # every changed pixel lies inside one common box: its row/col extents are shared
    rows = changed.any(0).any(1).nonzero().flatten()
    cols = changed.any(0).any(0).nonzero().flatten()
    if len(rows):
        box = torch.zeros_like(changed[0])
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert not (changed & ~box).any()
    x3, y3 = cutmix(x, y, p=0.0, generator=g, mode="batch")
    assert torch.equal(x3, x) and torch.equal(y3, y)


def test_rock_paste_images_pastes_whole_rock_masks():
    masks = random_masks(3, 8, rock_p=0.0)
    masks[2, 3:6, 4:9] = 4
    masks[5, 10:12, 20:30] = 4
    rocks = RockImages.from_arrays(encode(masks), masks)
    assert len(rocks) == 2
    x, y = batch(7, 16)
    y[y == 4] = 1
    x = torch.from_numpy(encode(y.numpy()))[:, None].float()
    g = torch.Generator().manual_seed(0)
    x2, y2 = rock_paste_images(x, y, rocks, p=1.0, generator=g)
    assert torch.equal(x2[:, 0], torch.from_numpy(encode(y2.numpy())).float())
    for i in range(16):  # each sample got exactly one source's rock pixels, in place
        got = y2[i] == 4
        assert any(torch.equal(got, r) for r in rocks.rock)
    x3, y3 = rock_paste_images(x, y, rocks, p=0.0, generator=g)
    assert torch.equal(x3, x) and torch.equal(y3, y)
    half = [int((rock_paste_images(x, y, rocks, p=0.5, generator=g)[1] == 4).flatten(1).any(1).sum())
            for _ in range(20)]
    assert 3 * 20 < sum(half) < 13 * 20  # about half of 16 per batch
