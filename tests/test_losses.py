"""Losses on hand-made tensors with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from marsseg.errors import InputError
from marsseg.losses import CombinedLoss, class_weights, cross_entropy, dice_loss, focal_loss

LN3 = math.log(3.0)


def pixels(logit_rows, targets):
    """Logits (1, 5, 1, n) and target (1, 1, n) from per-pixel rows."""
    logits = torch.tensor(logit_rows, dtype=torch.float32).T.reshape(1, 5, 1, -1)
    return logits, torch.tensor(targets).reshape(1, 1, -1)


# pixel a: truth 1, p1 = 3/7 (logit ln 3, others 0)  -> CE ln(7/3)
# pixel b: truth 2, uniform logits, p2 = 1/5          -> CE ln 5
# pixel c: truth 0, confidently wrong (class 3)       -> large CE
ROWS = [[0, LN3, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 9.0, 0]]
LA, LB = math.log(7 / 3), math.log(5)


def test_cross_entropy_by_hand_and_background_ignored():
    logits, target = pixels(ROWS, [1, 2, 0])
    lc = -torch.log_softmax(torch.tensor(ROWS[2]), 0)[0].item()
    assert cross_entropy(logits, target).item() == pytest.approx((LA + LB + lc) / 3, rel=1e-5)
    assert cross_entropy(logits, target, ignore_background=True).item() == pytest.approx(
        (LA + LB) / 2, rel=1e-5)


@pytest.mark.parametrize("loss", [
    lambda lg, t: cross_entropy(lg, t, ignore_background=True),
    lambda lg, t: dice_loss(lg, t, ignore_background=True),
    lambda lg, t: focal_loss(lg, t, ignore_background=True),
    lambda lg, t: CombinedLoss({"ce": 1, "dice": 1, "focal": 1}, ignore_background=True)(lg, t),
], ids=["ce", "dice", "focal", "combined"])
def test_background_pixels_have_no_influence(loss):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 6)
    target = torch.randint(0, 5, (2, 4, 6))
    target[0, 0, :] = 0
    # change the logits of exactly the pixels whose truth is 0, by a lot
    bg = (target == 0).unsqueeze(1).expand_as(logits)
    other = torch.where(bg, torch.randn_like(logits) * 10, logits)
    assert loss(other, target).item() == pytest.approx(loss(logits, target).item(), rel=1e-6)
    # and the gradient on those pixels is exactly 0
    lg = logits.clone().requires_grad_(True)
    loss(lg, target).backward()
    assert lg.grad[bg].abs().max().item() == 0.0
    assert lg.grad[~bg].abs().max().item() > 0.0


def test_background_counts_without_ignore():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    moved = logits.clone()
    moved[0, 3, 2:] += 5.0  # push background pixels towards class 3
    for fn in (cross_entropy, dice_loss, focal_loss):
        assert fn(moved, target).item() > fn(logits, target).item()


def test_class_weights_change_the_loss_as_expected():
    logits, target = pixels(ROWS[:2], [1, 2])
    w = torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])
    # weighted mean: (3 * LA + 1 * LB) / (3 + 1)
    assert cross_entropy(logits, target, weight=w).item() == pytest.approx((3 * LA + LB) / 4, rel=1e-5)
    assert cross_entropy(logits, target).item() == pytest.approx((LA + LB) / 2, rel=1e-5)
    # LA < LB, so up-weighting class 1 lowers the loss, up-weighting class 2 raises it
    w2 = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0])
    assert cross_entropy(logits, target, w).item() < cross_entropy(logits, target).item()
    assert cross_entropy(logits, target, w2).item() > cross_entropy(logits, target).item()
    # zero weight on class 0 is the same as ignoring it
    logits3, target3 = pixels(ROWS, [1, 2, 0])
    w0 = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    assert cross_entropy(logits3, target3, w0).item() == pytest.approx(
        cross_entropy(logits3, target3, ignore_background=True).item(), rel=1e-6)


def test_focal_by_hand():
    # truth 1 with logit ln 4 vs four zeros: p_t = 4/8 = 1/2 -> (1/2)^2 * ln 2
    logits, target = pixels([[0, math.log(4), 0, 0, 0]], [1])
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(0.25 * math.log(2), rel=1e-5)
    logits, target = pixels(ROWS, [1, 2, 0])
    w = torch.tensor([0.5, 3.0, 1.0, 1.0, 1.0])
    for ib in (False, True):  # gamma 0 is exactly weighted cross entropy
        assert focal_loss(logits, target, 0.0, w, ib).item() == pytest.approx(
            cross_entropy(logits, target, w, ib).item(), rel=1e-6)


def test_dice_by_hand():
    # 4 pixels of truth 1, uniform logits (p = 1/5 each), smooth 0:
    # class 1 dice = 2 * 0.8 / (0.8 + 4) = 1/3; classes 0,2,3,4 dice = 0
    logits = torch.zeros(1, 5, 2, 2)
    target = torch.ones(1, 2, 2, dtype=torch.long)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - (1 / 3) / 5)
    assert dice_loss(logits, target, ignore_background=True, smooth=0.0).item() == pytest.approx(
        1 - (1 / 3) / 4)
    perfect = torch.full((1, 5, 2, 2), -20.0)
    perfect[:, 1] = 20.0
    assert dice_loss(perfect, target, smooth=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_all_background_batch_is_zero_not_nan():
    logits = torch.randn(1, 5, 2, 2, requires_grad=True)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    for fn in (cross_entropy, focal_loss):
        v = fn(logits, target, ignore_background=True)
        assert v.item() == 0.0
        v.backward()
        assert torch.isfinite(logits.grad).all()


def test_class_weight_methods_by_hand():
    torch.testing.assert_close(class_weights([1, 2, 4, 8], "inverse"),
                               torch.tensor([1, 0.5, 0.25, 0.125]) / 0.46875)
    torch.testing.assert_close(class_weights([1000, 1, 4], "inverse_sqrt", ignore_background=True),
                               torch.tensor([0.0, 4 / 3, 2 / 3]))
    # effective number, beta 1/2: (1-b)/(1-b^n) = 1 for n=1, 2/3 for n=2; mean 5/6
    torch.testing.assert_close(class_weights([1, 2], "effective", beta=0.5),
                               torch.tensor([6 / 5, 4 / 5]))
    torch.testing.assert_close(class_weights([5, 7, 9], "none"), torch.ones(3))
    # a class missing from the data gets the largest weight, not infinity
    w = class_weights([10, 0, 10], "inverse")
    assert torch.isfinite(w).all() and int(w.argmax()) == 1
    # effective-number weights approach uniform as beta -> 0 and inverse as beta -> 1
    counts = [100, 1000, 10]
    assert float(class_weights(counts, "effective", beta=1e-6).std()) < 1e-4
    torch.testing.assert_close(class_weights(counts, "effective", beta=1 - 1e-9),
                               class_weights(counts, "inverse"), rtol=1e-4, atol=1e-5)


def test_class_weight_errors():
    with pytest.raises(InputError, match="method"):
        class_weights([1, 2], "log")
    with pytest.raises(InputError, match="beta"):
        class_weights([1, 2], "effective", beta=1.0)


def test_combined_loss_sums_and_deep_supervision():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    t = torch.randint(0, 5, (2, 4, 4))
    w = class_weights([10, 20, 30, 40, 5], "inverse", ignore_background=True)
    loss = CombinedLoss({"ce": 1.0, "dice": 0.5}, weight=w, ignore_background=True)
    single = cross_entropy(a, t, w, True) + 0.5 * dice_loss(a, t, True)
    assert loss(a, t).item() == pytest.approx(single.item(), rel=1e-6)
    # list: weights 1, 1/2 normalised -> 2/3, 1/3
    assert loss([a, b], t).item() == pytest.approx(
        (2 / 3) * loss(a, t).item() + (1 / 3) * loss(b, t).item(), rel=1e-6)
    assert loss.weight is not None and loss.to(torch.float64).weight.dtype == torch.float64


def test_combined_loss_errors():
    with pytest.raises(InputError, match="lovasz"):
        CombinedLoss({"lovasz": 1.0})
    with pytest.raises(InputError, match="5 values"):
        CombinedLoss({"ce": 1.0}, weight=[1.0, 2.0])
