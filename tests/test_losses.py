from __future__ import annotations

import math

import pytest
import torch

from oltr.errors import InputError
from oltr.losses import LargeMarginCentroidLoss, OriginalCentroidLoss, build_centroid_loss

# two centroids 5 apart; f1 = (1, 0) of class 0, f2 = (3, 0) of class 1
CENTROIDS = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
FEATURES = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
LABELS = torch.tensor([0, 1])


def test_large_margin_loss_known_answer():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    # per sample: max(0, 0 - 5 + 5) = 0; 1 - sqrt(20) + 5; 4 - 3 + 5 = 6
    expected = (0.0 + (6 - math.sqrt(20)) + 6.0) / 3
    loss = LargeMarginCentroidLoss(margin=5.0)(features, labels, CENTROIDS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_large_margin_loss_sums_over_all_other_centroids():
    centroids = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    # own = 0, others = 3 + 4: max(0, 0 - 7 + 10) = 3
    loss = LargeMarginCentroidLoss(margin=10.0)(torch.zeros(1, 2), torch.tensor([0]), centroids)
    assert loss.item() == pytest.approx(3.0)


def test_large_margin_loss_gradients_pull_and_push():
    features = torch.tensor([[1.0, 0.0]], requires_grad=True)
    centroids = CENTROIDS.clone().requires_grad_(True)
    LargeMarginCentroidLoss()(features, torch.tensor([0]), centroids).backward()
    # own centroid pulled toward the feature, the other pushed away from it
    assert centroids.grad[0, 0] < 0  # gradient descent moves c0 toward +x (the feature)
    away = centroids.grad[1] @ (features.detach()[0] - CENTROIDS[1])
    assert away > 0  # descent moves c1 along (c1 - f), away from the feature


def test_original_loss_known_answer():
    # attract = (‖f1 - c0‖² + ‖f2 - c1‖²) / (2B) = (1 + 16) / 4 = 4.25
    # repel distance = (‖f1 - c1‖² + ‖f2 - c0‖²) / (B·K) = (20 + 9) / 4 = 7.25
    # loss = 4.25 + 0.01 · max(0, 10 - 7.25) = 4.2775
    for update in ("original", "autograd"):
        loss = OriginalCentroidLoss(centroid_update=update)(FEATURES, LABELS, CENTROIDS)
        assert loss.item() == pytest.approx(4.2775, rel=1e-6)


def test_original_loss_repel_hinge_is_inactive_far_away():
    loss = OriginalCentroidLoss()(FEATURES * 10, LABELS, CENTROIDS * 10)
    assert loss.item() == pytest.approx((100 + 1600) / 4, rel=1e-6)


def _gradients(update: str, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    features = FEATURES.clone().requires_grad_(True)
    centroids = CENTROIDS.clone().requires_grad_(True)
    (weight * OriginalCentroidLoss(centroid_update=update)(features, LABELS, centroids)).backward()
    return features.grad, centroids.grad


def test_original_centroid_update_known_answer():
    _, grad_c = _gradients("original", 1.0)
    # attract: (c_k - f) / ((1 + n_k)·B): c0: (-1, 0)/4; c1: (0, 4)/4
    # repel (autograd): 0.01 · 2(f - c)/4 for the other-class pairs: c0: 0.005·(3, 0),
    # c1: 0.005·(-2, -4)
    torch.testing.assert_close(grad_c, torch.tensor([[-0.235, 0.0], [-0.01, 0.98]]))
    # the hand-written attract gradient ignores the loss weight; the repel part does not
    _, grad_c_half = _gradients("original", 0.5)
    torch.testing.assert_close(grad_c_half, torch.tensor([[-0.2425, 0.0], [-0.005, 0.99]]))


def test_autograd_centroid_update_and_equal_feature_gradients():
    grad_f_orig, _ = _gradients("original", 0.5)
    grad_f_auto, grad_c_auto = _gradients("autograd", 0.5)
    torch.testing.assert_close(grad_f_orig, grad_f_auto)
    # 0.5 · [attract (c_k - f)/B + repel]
    torch.testing.assert_close(
        grad_c_auto, 0.5 * torch.tensor([[-0.5 + 0.015, 0.0], [-0.01, 2.0 - 0.02]])
    )


def test_losses_accept_bfloat16_features():
    features = FEATURES.to(torch.bfloat16).requires_grad_(True)
    centroids = CENTROIDS.clone().requires_grad_(True)
    for loss_fn in (LargeMarginCentroidLoss(), OriginalCentroidLoss()):
        features.grad = centroids.grad = None
        loss = loss_fn(features, LABELS, centroids)
        loss.backward()
        assert torch.isfinite(loss) and features.grad.dtype == torch.bfloat16
        assert centroids.grad.dtype == torch.float32


def test_build_centroid_loss():
    assert isinstance(build_centroid_loss("printed", margin=2.0), LargeMarginCentroidLoss)
    original = build_centroid_loss("original", margin=10.0)
    assert isinstance(original, OriginalCentroidLoss) and original.margin == 10.0
    with pytest.raises(InputError, match="nearest, printed, original"):
        build_centroid_loss("triplet")
    with pytest.raises(InputError):
        OriginalCentroidLoss(centroid_update="sgd")


def test_shape_errors():
    with pytest.raises(InputError):
        LargeMarginCentroidLoss()(torch.zeros(2, 3), LABELS, CENTROIDS)


def test_nearest_centroid_loss_known_answer():
    """max(0, d(v, c_y) − min_{i≠y} d(v, c_i) + m), per sample, averaged."""
    from oltr.losses import NearestCentroidLoss

    centroids = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    labels = torch.tensor([0, 2, 1])
    # 1 − 2 + 1 = 0 (boundary, inactive); 3 − 1 + 1 = 3; 3 − min(√18, √10) + 1
    expected = (0.0 + 3.0 + (4.0 - math.sqrt(10.0))) / 3
    loss = NearestCentroidLoss(margin=1.0)
    assert loss(features, labels, centroids).item() == pytest.approx(expected, rel=1e-6)
    assert loss.hinge(features, labels, centroids).tolist() == pytest.approx(
        [0.0, 3.0, 4.0 - math.sqrt(10.0)], abs=1e-6)
    # relative margin: m·‖v‖ = 0.5 · (1, 1, √18)
    relative = NearestCentroidLoss(margin=0.5, relative=True)
    assert relative.hinge(features, labels, centroids).tolist() == pytest.approx(
        [-0.5, 2.5, 3.0 - math.sqrt(10.0) + 0.5 * math.sqrt(18.0)], abs=1e-6)


def test_nearest_centroid_loss_acts_where_the_printed_sum_cannot():
    """Random clusters with K = 100: the printed sum over K − 1 centroids never opens, the
    nearest-centroid hinge opens for the samples closest to a competitor."""
    from oltr.losses import NearestCentroidLoss

    generator = torch.Generator().manual_seed(0)
    centroids = torch.randn(100, 16, generator=generator) * 3
    labels = torch.randint(0, 100, (512,), generator=generator)
    features = centroids[labels] + torch.randn(512, 16, generator=generator) * 1.5
    printed = LargeMarginCentroidLoss(margin=5.0).hinge(features, labels, centroids)
    nearest = NearestCentroidLoss(margin=5.0).hinge(features, labels, centroids)
    assert (printed > 0).float().mean() == 0.0
    assert 0.05 < (nearest > 0).float().mean() < 1.0


def test_nearest_centroid_loss_moves_the_centroids():
    from oltr.losses import NearestCentroidLoss

    centroids = torch.tensor([[0.0, 0.0], [2.0, 0.0]], requires_grad=True)
    features = torch.tensor([[1.2, 0.0]], requires_grad=True)
    NearestCentroidLoss(margin=1.0)(features, torch.tensor([0]), centroids).backward()
    assert centroids.grad[0, 0] < 0  # own centroid pulled toward +x (the feature)
    assert centroids.grad[1, 0] < 0  # the competitor pushed away (descent moves it to +x)
    assert features.grad[0, 0] > 0  # the feature pulled back toward its own centroid


def test_original_form_has_no_relative_margin():
    with pytest.raises(InputError, match="no relative margin"):
        build_centroid_loss("original", margin=10.0, relative=True)
    with pytest.raises(InputError, match="'paper' is now 'printed'"):
        build_centroid_loss("paper")
