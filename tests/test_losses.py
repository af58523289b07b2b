"""Losses on hand-made tensors with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from marsseg.errors import InputError
from marsseg.losses import (
    CombinedLoss,
    class_weights,
    cross_entropy,
    dice_loss,
    focal_loss,
    lovasz_softmax,
    lovasz_softmax_probs,
)

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
    lambda lg, t: lovasz_softmax(lg, t, ignore_background=True),
    lambda lg, t: CombinedLoss({"ce": 1, "dice": 1, "focal": 1, "lovasz": 1},
                               ignore_background=True)(lg, t),
], ids=["ce", "dice", "focal", "lovasz", "combined"])
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
    for fn in (cross_entropy, dice_loss, focal_loss, lovasz_softmax):
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
    for fn in (cross_entropy, focal_loss, lovasz_softmax):
        logits.grad = None
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
    with pytest.raises(InputError, match="lovász"):
        CombinedLoss({"lovász": 1.0})
    with pytest.raises(InputError, match="5 values"):
        CombinedLoss({"ce": 1.0}, weight=[1.0, 2.0])


# --- Lovász-softmax ------------------------------------------------------------------------------


def jaccard_loss_of_set(wrong: torch.Tensor, fg: torch.Tensor) -> float:
    """Δ_J(M) = |M| / |fg ∪ M| for the set M of mispredicted pixels (Berman et al., eq. 5)."""
    union = (fg | wrong).sum().item()
    return wrong.sum().item() / union if union else 0.0


def lovasz_by_thresholds(errors: torch.Tensor, fg: torch.Tensor) -> float:
    """The Lovász extension as an integral over thresholds: ∫_0^1 Δ_J({i: m_i >= t}) dt.

    Exact for m in [0, 1]^p: the set {m_i >= t} only changes at the error values, so
    the integral is a sum over the sorted distinct values (no sorting-gradient formula).
    """
    levels = sorted({0.0, *errors.tolist()})
    total = 0.0
    for lo, hi in zip(levels[:-1], levels[1:], strict=True):
        total += (hi - lo) * jaccard_loss_of_set(errors >= hi, fg)
    return total


def test_lovasz_on_one_hot_predictions_is_one_minus_iou():
    # 6 pixels, truth [1,1,1,2,2,3]; hard predictions [1,1,2,2,3,3]
    # IoU_1 = 2/3, IoU_2 = 1/3 (inter 1, union 3), IoU_3 = 1/2 -> mean (1/3 + 2/3 + 1/2) / 3
    labels = torch.tensor([1, 1, 1, 2, 2, 3])
    pred = torch.tensor([1, 1, 2, 2, 3, 3])
    probs = torch.nn.functional.one_hot(pred, 5).float()
    expected = ((1 - 2 / 3) + (1 - 1 / 3) + (1 - 1 / 2)) / 3
    assert lovasz_softmax_probs(probs, labels).item() == pytest.approx(expected, rel=1e-6)
    # the same through logits (near one-hot softmax), and with background pixels ignored
    logits = (probs * 40.0 - 20.0).T.reshape(1, 5, 1, 6)
    target = labels.reshape(1, 1, 6)
    assert lovasz_softmax(logits, target).item() == pytest.approx(expected, abs=1e-6)
    with_bg = torch.cat([logits, torch.randn(1, 5, 1, 3) * 5], dim=3)
    target_bg = torch.cat([target, torch.zeros(1, 1, 3, dtype=torch.long)], dim=2)
    assert lovasz_softmax(with_bg, target_bg, ignore_background=True).item() == pytest.approx(
        expected, abs=1e-6)
    perfect = torch.nn.functional.one_hot(labels, 5).float()
    assert lovasz_softmax_probs(perfect, labels).item() == 0.0


def test_lovasz_by_hand_on_soft_probabilities():
    # two classes present. Pixels (p0, p1): a (0.2, 0.8) truth 1, b (0.6, 0.4) truth 1,
    # c (0.7, 0.3) truth 0. Class 1 errors: a 0.2, b 0.6, c 0.3 -> order b, c, a:
    #   Δ after b: 1/2; after b,c: 2/3; after all: 3/3 -> 0.6*1/2 + 0.3*(1/6) + 0.2*(1/3)
    # Class 0 errors: a 0.2, b 0.6, c 0.3 (fg = c) -> order b, c, a:
    #   Δ({b}) = 1/2; Δ({b,c}) = 2/2 (IoU 0); Δ({b,c,a}) = 3/3 -> 0.6*1/2 + 0.3*1/2 + 0.2*0
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    labels = torch.tensor([1, 1, 0])
    c1 = 0.6 / 2 + 0.3 / 6 + 0.2 / 3
    c0 = 0.6 / 2 + 0.3 / 2
    assert lovasz_softmax_probs(probs, labels).item() == pytest.approx((c0 + c1) / 2, rel=1e-6)


def test_lovasz_matches_the_threshold_integral_on_random_probabilities():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(3, 40, (), generator=gen))
        logits = torch.randn(n, 5, generator=gen) * 2
        labels = torch.randint(0, 5, (n,), generator=gen)
        probs = logits.softmax(1)
        brute = []
        for c in range(5):
            fg = labels == c
            if fg.any():  # "present" classes only
                brute.append(lovasz_by_thresholds((fg.float() - probs[:, c]).abs(), fg))
        assert lovasz_softmax_probs(probs, labels).item() == pytest.approx(
            sum(brute) / len(brute), rel=1e-5, abs=1e-6)


def test_lovasz_gradient_favours_the_rare_class_and_batch_is_one_set():
    # a batch of two images: the loss is over the union of their pixels, not a mean per image
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 3, 4)
    target = torch.randint(1, 5, (2, 3, 4))
    flat_probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 5)
    assert lovasz_softmax(logits, target).item() == pytest.approx(
        lovasz_softmax_probs(flat_probs, target.reshape(-1)).item(), rel=1e-6)
    # one big-rock pixel among many soil pixels: raising its class-4 logit lowers the loss
    # by far more than raising one soil pixel's soil logit (IoU counts the rare class equally)
    lg = torch.zeros(1, 5, 1, 20, requires_grad=True)
    t = torch.ones(1, 1, 20, dtype=torch.long)
    t[0, 0, 7] = 4
    lovasz_softmax(lg, t).backward()
    assert -lg.grad[0, 4, 0, 7] > 5 * -lg.grad[0, 1, 0, 0]


def test_combined_loss_has_the_lovasz_term():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 4, 4)
    t = torch.randint(0, 5, (2, 4, 4))
    loss = CombinedLoss({"ce": 1.0, "lovasz": 0.5}, ignore_background=True)
    assert loss(a, t).item() == pytest.approx(
        (cross_entropy(a, t, None, True) + 0.5 * lovasz_softmax(a, t, True)).item(), rel=1e-6)
