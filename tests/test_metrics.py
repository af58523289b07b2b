"""Course metric on hand-made arrays; every expected number is worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marsseg.errors import InputError
from marsseg.metrics import (
    ConfusionMeter,
    class_iou,
    confusion_matrix,
    course_miou,
    full_confusion_matrix,
    pixel_accuracy,
)

# 8 pixels; class 4 absent from truth and prediction.
TRUTH = np.array([[0, 0, 1, 1], [1, 2, 2, 3]])
PRED = np.array([[1, 0, 1, 1], [0, 2, 3, 3]])
# pixel 4 (truth 1) is predicted 0: class 0 predicted on a labeled pixel.


def test_confusion_matrix_drops_truth_zero():
    cm = confusion_matrix(PRED, TRUTH)
    expected = np.zeros((5, 5), dtype=np.int64)
    expected[1, 1] = 2
    expected[1, 0] = 1
    expected[2, 2] = 1
    expected[2, 3] = 1
    expected[3, 3] = 1
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)


def test_full_confusion_matrix_keeps_truth_zero():
    cm = full_confusion_matrix(PRED, TRUTH)
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm.sum() == 8


def test_class_iou_and_course_miou_by_hand():
    cm = confusion_matrix(PRED, TRUTH)
    iou = class_iou(cm)
    # class 0: tp 0, union = predicted on 1 labeled pixel -> 0
    # class 1: tp 2, truth 3, pred 2 -> 2/3;  class 2: 1/(2+1-1) = 1/2
    # class 3: tp 1, truth 1, pred 2 -> 1/2;  class 4: no union -> NaN
    np.testing.assert_allclose(iou[:4], [0.0, 2 / 3, 0.5, 0.5])
    assert math.isnan(iou[4])
    assert course_miou(cm) == pytest.approx((0 + 2 / 3 + 0.5 + 0.5) / 4)  # 5/12
    assert pixel_accuracy(cm) == pytest.approx(4 / 6)


def test_class_zero_absent_when_never_predicted_on_labeled_pixels():
    pred = PRED.copy()
    pred[1, 0] = 1  # now class 0 is predicted only on a truth-0 pixel, which is dropped
    cm = confusion_matrix(pred, TRUTH)
    iou = class_iou(cm)
    assert math.isnan(iou[0]) and math.isnan(iou[4])
    # class 1: tp 3, truth 3, pred 3 (the truth-0 pixel predicted 1 does not count) -> 1
    assert course_miou(cm) == pytest.approx((1.0 + 0.5 + 0.5) / 3)


def test_course_miou_of_full_matrix_applies_the_rule():
    assert course_miou(full_confusion_matrix(PRED, TRUTH)) == pytest.approx(5 / 12)


def test_one_matrix_over_the_set_not_mean_of_batches():
    meter = ConfusionMeter()
    meter.update(torch.tensor([1, 1]), torch.tensor([1, 1]))  # alone: mIoU 1
    meter.update(torch.tensor([1]), torch.tensor([2]))        # alone: mIoU 0
    # together: class 1 tp 2, truth 2, pred 3 -> 2/3; class 2 -> 0; mean 1/3 (not 1/2)
    assert meter.miou() == pytest.approx(1 / 3)
    np.testing.assert_allclose(meter.iou()[1:3], [2 / 3, 0.0])
    assert meter.accuracy() == pytest.approx(2 / 3)
    meter.reset()
    assert meter.cm.sum() == 0 and math.isnan(meter.miou())


def test_meter_accumulates_like_one_call():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, (4, 8, 16)), rng.integers(0, 5, (4, 8, 16))
    meter = ConfusionMeter(full=True)
    for i in range(4):
        meter.update(p[i], t[i])
    np.testing.assert_array_equal(meter.cm, full_confusion_matrix(p, t))
    assert meter.miou() == pytest.approx(course_miou(confusion_matrix(p, t)))


def test_perfect_and_torch_inputs():
    t = torch.tensor([[0, 1, 2, 3, 4]])
    assert course_miou(confusion_matrix(t, t)) == 1.0
    assert pixel_accuracy(confusion_matrix(t.numpy(), t)) == 1.0


def test_bad_labels_and_shapes():
    with pytest.raises(InputError, match="0..4"):
        confusion_matrix(np.array([5]), np.array([1]))
    with pytest.raises(InputError, match="pixels"):
        confusion_matrix(np.array([1, 2]), np.array([1]))


def test_torch_and_numpy_paths_agree():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 5, (3, 8, 8)), rng.integers(0, 5, (3, 8, 8))
    ref = full_confusion_matrix(p, t)
    np.testing.assert_array_equal(full_confusion_matrix(torch.from_numpy(p), torch.from_numpy(t)), ref)
    np.testing.assert_array_equal(full_confusion_matrix(torch.from_numpy(p).to(torch.uint8), t), ref)
    with pytest.raises(InputError, match="0..4"):
        confusion_matrix(torch.tensor([1]), torch.tensor([7]))
