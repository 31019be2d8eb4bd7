"""Confusion matrix and mIoU against hand-built known answers and an independent set-based IoU."""

import math

import numpy as np
import pytest
import torch

from algm_viz.evaluation.metrics import (bootstrap_weights, confusion_matrices, confusion_matrix, miou, miou_batch,
                                         paired_bootstrap)


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


def _random_confusions(rng: np.random.Generator, images: int, k: int) -> torch.Tensor:
    """``[N, K, K]`` per-image matrices from random label/prediction maps (mostly correct)."""
    target = torch.from_numpy(rng.integers(0, k, (images, 6, 7)))
    pred = torch.where(torch.from_numpy(rng.random((images, 6, 7)) < 0.7), target,
                       torch.from_numpy(rng.integers(0, k, (images, 6, 7))))
    return confusion_matrices(pred, target, k)


def test_per_image_confusion_matrices_sum_to_the_pooled_one():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 4, (3, 5, 6)))
    target[1, :2] = 255
    pred = torch.from_numpy(rng.integers(0, 3, (3, 5, 6)))
    per_image = confusion_matrices(pred, target, 3 + 1)
    assert per_image.shape == (3, 4, 4)
    assert torch.equal(per_image.sum(0), confusion_matrix(pred, target, 4))
    for i in range(3):
        assert torch.equal(per_image[i], confusion_matrix(pred[i], target[i], 4))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrices(pred + 5, target, 4)


def test_miou_batch_matches_miou_per_matrix():
    stack = _random_confusions(np.random.default_rng(1), 5, 4)
    stack[2, 3, :] = 0
    stack[2, :, 3] = 0  # class 3 absent in one matrix: left out of its mean, as miou does
    assert torch.allclose(miou_batch(stack), torch.tensor([miou(c)[0] for c in stack], dtype=torch.float64))
    assert math.isnan(float(miou_batch(torch.zeros(1, 3, 3))[0]))


def test_bootstrap_of_identical_predictions_is_exactly_zero():
    stack = _random_confusions(np.random.default_rng(2), 12, 3)
    result = paired_bootstrap(stack, stack.clone(), resamples=200, seed=3)
    assert result["delta"] == 0 and result["delta_ci"] == [0.0, 0.0] and result["resamples"] == 200
    low, high = result["ci"]
    assert low < miou(stack.sum(0))[0] < high


def test_bootstrap_of_a_constant_shift():
    # Every image: the reference gets 1 of 2 pixels of each class right, the other all; IoU 1/3 vs 1 per class
    # in every resample, so the difference is exactly 66.67 points whatever the draw.
    k, images = 2, 9
    reference = torch.tensor([[1, 1], [1, 1]]).expand(images, k, k).clone()
    other = torch.tensor([[2, 0], [0, 2]]).expand(images, k, k).clone()
    result = paired_bootstrap(reference, other, resamples=100, seed=0)
    assert result["delta"] == pytest.approx(200 / 3)
    assert result["delta_ci"] == pytest.approx([200 / 3, 200 / 3])


def test_bootstrap_matches_a_brute_force_resampling():
    rng = np.random.default_rng(4)
    reference, other = _random_confusions(rng, 4, 3), _random_confusions(rng, 4, 3)
    resamples, seed = 64, 7
    weights = bootstrap_weights(4, resamples, seed)
    assert torch.equal(weights.sum(1), torch.full((resamples,), 4.0))  # each resample draws N images
    draws = torch.randint(4, (resamples, 4), generator=torch.Generator().manual_seed(seed))
    deltas = []
    for row in draws:  # resample by hand: pool the drawn images (with repeats) and take the mIoU
        deltas.append(miou(other[row].sum(0))[0] - miou(reference[row].sum(0))[0])
    expected = np.quantile(np.array(deltas), [0.025, 0.975])
    result = paired_bootstrap(reference, other, resamples=resamples, seed=seed, chunk=10)
    assert result["delta_ci"] == pytest.approx(expected.tolist())
    assert result["delta"] == pytest.approx(miou(other.sum(0))[0] - miou(reference.sum(0))[0])
    assert paired_bootstrap(reference, other, resamples=resamples, seed=seed) == result  # seeded
    assert paired_bootstrap(reference, other, resamples=resamples, seed=seed + 1)["delta_ci"] != result["delta_ci"]
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(reference, other[:3])
