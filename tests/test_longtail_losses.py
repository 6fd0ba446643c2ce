"""Competing methods' losses: known answers computed by hand (issue 4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oltr.errors import InputError
from oltr.losses import (
    CLASSIFICATION_LOSSES,
    BalancedSoftmaxLoss,
    FocalLoss,
    LDAMLoss,
    LiftedStructureLoss,
    LogitAdjustedLoss,
    RangeLoss,
    build_classification_loss,
    build_feature_loss,
    drw_class_weights,
)

torch.set_num_threads(1)


def random_batch(num_classes: int = 4, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, num_classes, generator=generator)
    labels = torch.randint(num_classes, (batch,), generator=generator)
    return logits, labels


# ---------------------------------------------------------------------------------- focal


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, labels = random_batch()
    expected = F.cross_entropy(logits, labels)
    assert FocalLoss(gamma=0.0)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_two_class_known_answer():
    # logits (0, ln 3) → p = (1/4, 3/4)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    labels = torch.tensor([1, 0])
    per_sample = [(1 / 4) ** 2 * -math.log(3 / 4), (3 / 4) ** 2 * -math.log(1 / 4)]
    loss = FocalLoss(gamma=2.0)(logits, labels)
    assert loss.item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    weighted = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])(logits, labels)
    assert weighted.item() == pytest.approx((0.75 * per_sample[0] + 0.25 * per_sample[1]) / 2,
                                            rel=1e-6)
    assert FocalLoss(gamma=2.0, alpha=0.5)(logits, labels).item() == pytest.approx(
        loss.item() / 2, rel=1e-6)


def test_focal_rejects_bad_arguments():
    with pytest.raises(InputError):
        FocalLoss(gamma=-1.0)
    with pytest.raises(InputError, match="built for 3"):
        FocalLoss(alpha=[1.0, 1.0, 1.0])(torch.zeros(2, 2), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- metric losses


def test_range_loss_known_answer():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0], [12.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    # class 0: squared pair distances 1, 9, 4 → top 2 (9, 4): 2 / (1/9 + 1/4) = 72/13
    # class 1: one pair (4) → 4; centres (4/3, 0) and (11, 0): squared distance (29/3)²
    intra = 72 / 13 + 4.0
    inter = 100.0 - (29 / 3) ** 2
    loss = RangeLoss(margin=100.0, k=2)(features, labels)
    assert loss.item() == pytest.approx(intra + inter, rel=1e-5)
    weighted = RangeLoss(margin=100.0, k=2, intra_weight=0.5, inter_weight=2.0)(features, labels)
    assert weighted.item() == pytest.approx(0.5 * intra + 2.0 * inter, rel=1e-5)
    # the margin is met: no inter-class term
    assert RangeLoss(margin=10.0)(features, labels).item() == pytest.approx(intra, rel=1e-5)


def test_range_loss_gradient_is_finite_for_duplicates():
    features = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]], requires_grad=True)
    loss = RangeLoss(margin=1.0)(features, torch.tensor([0, 0, 1]))
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_lifted_structure_known_answer_on_four_points():
    features = torch.tensor([[0.0], [1.0], [3.0], [4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # pair (0,1): D = 1, negatives of 0: D = 3, 4; of 1: D = 2, 3 (margin 1)
    objective = math.log(2 * math.exp(-2) + math.exp(-3) + math.exp(-1)) + 1.0
    # pair (2,3) is the mirror image: same objective; L = (2 · J²) / (2 · 2)
    loss = LiftedStructureLoss(margin=1.0)(features, labels)
    assert loss.item() == pytest.approx(objective**2 / 2, rel=1e-6)


def test_lifted_structure_without_pairs_is_zero_with_a_gradient():
    features = torch.randn(3, 2, requires_grad=True)
    loss = LiftedStructureLoss()(features, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros(3, 2))
    assert LiftedStructureLoss()(features, torch.tensor([1, 1, 1])).item() == 0.0


# ---------------------------------------------------------------------- prior-shifted CE


def test_balanced_softmax_and_logit_adjustment_are_ce_on_balanced_counts():
    logits, labels = random_batch()
    expected = F.cross_entropy(logits, labels).item()
    assert BalancedSoftmaxLoss([7, 7, 7, 7])(logits, labels).item() == pytest.approx(expected)
    assert LogitAdjustedLoss([7, 7, 7, 7], tau=2.0)(logits, labels).item() == pytest.approx(
        expected)


def test_balanced_softmax_and_logit_adjustment_known_answers():
    logits, labels = torch.zeros(1, 2), torch.tensor([0])
    # z + log n = (0, ln 3) → −log(1/4)
    assert BalancedSoftmaxLoss([1, 3])(logits, labels).item() == pytest.approx(math.log(4))
    assert LogitAdjustedLoss([1, 3], tau=1.0)(logits, labels).item() == pytest.approx(math.log(4))
    # τ = 2: z + 2 log π differs by 2 ln 3 between the classes → log(1 + 9)
    assert LogitAdjustedLoss([1, 3], tau=2.0)(logits, labels).item() == pytest.approx(
        math.log(10))


def test_class_counts_are_checked():
    with pytest.raises(InputError, match="class 1"):
        BalancedSoftmaxLoss([3, 0, 2])
    with pytest.raises(InputError, match="built for 3"):
        BalancedSoftmaxLoss([3, 1, 2])(torch.zeros(1, 2), torch.tensor([0]))


# ------------------------------------------------------------------------------ LDAM + DRW


def test_ldam_margins_and_known_answer():
    loss = LDAMLoss([16, 1], max_margin=0.5, scale=10.0)
    # n^{-1/4} = (1/2, 1), scaled to a maximum of 0.5
    assert loss.margins.tolist() == pytest.approx([0.25, 0.5])
    # true class 0: 10 · (0.2 − 0.25, 0.1) = (−0.5, 1) → log(1 + e^{1.5})
    value = loss(torch.tensor([[0.2, 0.1]]), torch.tensor([0]))
    assert value.item() == pytest.approx(math.log1p(math.exp(1.5)), rel=1e-6)


def test_ldam_weight_is_the_cross_entropy_weight():
    logits, labels = random_batch(num_classes=3)
    weight = torch.tensor([0.5, 1.0, 2.0])
    loss = LDAMLoss([30, 10, 2], max_margin=0.3, scale=2.0)
    shifted = logits - 0.3 * (torch.tensor([30, 10, 2]) / 2) ** -0.25 * F.one_hot(labels, 3)
    expected = F.cross_entropy(2.0 * shifted, labels, weight=weight)
    loss.weight = weight  # what the deferred re-weighting does
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_drw_class_weights_known_answer():
    # β = 0.5: (1 − β)/(1 − β^n) = 1 and 2/3 → scaled to sum 2: 1.2 and 0.8
    assert drw_class_weights([1, 2], beta=0.5).tolist() == pytest.approx([1.2, 0.8])
    assert drw_class_weights([5, 500], beta=0.0).tolist() == pytest.approx([1.0, 1.0])
    weights = drw_class_weights([1000, 100, 10], beta=0.9999)
    assert weights.sum().item() == pytest.approx(3.0) and weights[2] > weights[1] > weights[0]
    with pytest.raises(InputError):
        drw_class_weights([1, 2], beta=1.0)


# -------------------------------------------------------------------------------- registry


def test_build_classification_loss():
    counts = [50, 10, 2]
    built = {name: build_classification_loss(name, class_counts=counts)
             for name in CLASSIFICATION_LOSSES}
    assert isinstance(built["ce"], nn.CrossEntropyLoss)
    assert isinstance(built["ldam"], LDAMLoss)
    assert build_classification_loss("focal", gamma=1.0).gamma == 1.0
    assert build_classification_loss("logit_adjusted", class_counts=counts, tau=0.5).tau == 0.5
    with pytest.raises(InputError, match="needs class_counts"):
        build_classification_loss("balanced_softmax")
    with pytest.raises(ValueError, match="ce, focal, balanced_softmax"):
        build_classification_loss("softmax")


def test_build_feature_loss():
    assert isinstance(build_feature_loss("range", margin=1.0), RangeLoss)
    assert isinstance(build_feature_loss("lifted"), LiftedStructureLoss)
    with pytest.raises(ValueError, match="range, lifted"):
        build_feature_loss("triplet")
