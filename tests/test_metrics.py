"""Confusion matrix and mIoU against hand-built known answers and an independent set-based IoU."""

import math

import numpy as np
import pytest
import torch

from algm_viz.evaluation.metrics import confusion_matrix, miou, pixel_accuracy


def test_confusion_matrix_counts_target_rows_prediction_columns():
    target = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [0, 2, 2]])
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    result = confusion_matrix(pred, target, 3)
    assert result.dtype == torch.long
    assert torch.equal(result, expected)


def test_ignore_index_is_respected_whatever_the_prediction():
    target = torch.full((4, 4), 255)
    target[0, 0] = 1
    pred = torch.randint(0, 2, (4, 4))
    result = confusion_matrix(pred, target, 2)
    assert int(result.sum()) == 1 and int(result[1].sum()) == 1
    custom = confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 1]), 2, ignore_index=7)
    assert torch.equal(custom, torch.tensor([[0, 0], [0, 1]]))


def test_miou_matches_independent_set_based_iou():
    rng = np.random.default_rng(0)
    k = 5
    target = rng.integers(0, k, (3, 17, 23))
    target[rng.random(target.shape) < 0.2] = 255
    target[target == 3] = 4  # class 3 absent from the target
    pred = rng.integers(0, k, target.shape)
    pred[pred == 3] = 2  # ... and from the prediction
    labelled = target != 255
    ious = []
    for c in range(k):
        inter = np.sum((pred == c) & (target == c) & labelled)
        union = np.sum(((pred == c) | (target == c)) & labelled)
        ious.append(100 * inter / union if union else math.nan)
    mean, per_class = miou(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), k))
    assert mean == pytest.approx(np.nanmean(ious), abs=1e-12)
    assert math.isnan(per_class[3]) and per_class.shape == (k,)
    np.testing.assert_allclose(per_class.numpy(), ious, atol=1e-12)


def test_class_only_in_prediction_counts_with_zero_iou():
    confusion = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 3)
    mean, per_class = miou(confusion)
    assert per_class[0] == pytest.approx(50.0) and per_class[1] == 0 and math.isnan(per_class[2])
    assert mean == pytest.approx(25.0)
    assert pixel_accuracy(confusion) == pytest.approx(50.0)


def test_perfect_prediction_and_no_labelled_pixels():
    target = torch.tensor([0, 1, 1, 2])
    assert miou(confusion_matrix(target, target, 3))[0] == pytest.approx(100.0)
    assert math.isnan(miou(confusion_matrix(target, torch.full_like(target, 255), 3))[0])


def test_confusion_matrices_add_up_over_parts():
    target = torch.randint(0, 4, (2, 9, 9))
    pred = torch.randint(0, 4, (2, 9, 9))
    whole = confusion_matrix(pred, target, 4)
    parts = confusion_matrix(pred[0], target[0], 4) + confusion_matrix(pred[1], target[1], 4)
    assert torch.equal(whole, parts)


@pytest.mark.parametrize(
    "pred, target, k",
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), 2),  # shapes differ
        (torch.tensor([0, 5]), torch.tensor([0, 1]), 2),  # prediction out of range
        (torch.tensor([0, 1]), torch.tensor([0, 9]), 2),  # target out of range, not ignore
        (torch.tensor([0]), torch.tensor([0]), 0),
    ],
)
def test_bad_input_raises_value_error(pred, target, k):
    with pytest.raises(ValueError):
        confusion_matrix(pred, target, k)


def test_miou_rejects_non_square_matrix():
    with pytest.raises(ValueError):
        miou(torch.zeros(2, 3, dtype=torch.long))
