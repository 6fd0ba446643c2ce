"""CosFace / ArcFace heads and losses: known answers on a 2-D toy case (issue 13)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oltr.errors import InputError
from oltr.losses import LDAMLoss
from oltr.models.classifiers import CosineClassifier
from oltr.models.margin import (
    ArcFaceLoss,
    CosFaceLoss,
    MarginClassifier,
    MarginSoftmaxLoss,
    apply_margin,
    arcface_target,
)

S = 64.0


def toy_head(kind: str = "arcface", **kwargs) -> MarginClassifier:
    """Three classes in 2-D: w0 along x, w1 along y (length 2: the head normalises), w2 = −x."""
    head = MarginClassifier(2, 3, kind=kind, **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))
    return head


def at_angle(degrees: float, length: float = 3.0) -> torch.Tensor:
    radians = math.radians(degrees)
    return torch.tensor([[length * math.cos(radians), length * math.sin(radians)]])


def test_head_returns_plain_scaled_cosines():
    # v at 60°: cos θ = (0.5, sin 60°, −0.5) to (w0, w1, w2); logits = 64 · cos θ.
    logits = toy_head()(at_angle(60))
    assert logits.tolist()[0] == pytest.approx([32.0, 64 * math.sqrt(3) / 2, -32.0], abs=1e-4)


def test_head_is_the_unit_cosine_classifier():
    head = toy_head("cosface")
    plain = CosineClassifier(2, 3, scale=64.0, squash_form="unit")
    plain.load_state_dict(head.state_dict())
    v = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(head(v), plain(v))
    assert set(head.state_dict()) == {"weight", "scale"}
    assert (head.margin, toy_head().margin) == (0.35, 0.5)


def test_cosface_lowers_only_the_target_logit_by_s_m():
    logits = toy_head("cosface")(at_angle(60))
    trained = CosFaceLoss().margin_logits(logits, torch.tensor([0]))
    # 64 · (0.5 − 0.35) = 9.6; the other classes keep 64 · cos θ.
    assert trained.tolist()[0] == pytest.approx([9.6, 55.425626, -32.0], abs=1e-4)


def test_arcface_known_logits():
    logits = toy_head()(at_angle(60))
    loss = ArcFaceLoss()
    # label 0: θ = 60°, target 64 · cos(π/3 + 0.5) = 64 · 0.0235966 = 1.51018.
    assert loss.margin_logits(logits, torch.tensor([0])).tolist()[0] == pytest.approx(
        [1.510181, 55.425626, -32.0], abs=1e-3)
    # label 2: θ = 120°, still below π − m: 64 · cos(2π/3 + 0.5) = 64 · (−0.853986) = −54.6551.
    assert loss.margin_logits(logits, torch.tensor([2])).tolist()[0] == pytest.approx(
        [32.0, 55.425626, -54.655103], abs=1e-3)


def test_arcface_threshold_and_easy_margin():
    # θ = 162° > π − 0.5 rad (151.35°): the reference's fallback cos θ − m·sin m.
    cosine = torch.tensor([math.cos(math.radians(162))])
    assert arcface_target(cosine).item() == pytest.approx(-0.951057 - 0.5 * 0.479426, abs=1e-5)
    # easy margin: no margin at or past 90°, cos(θ + m) before.
    cosines = torch.tensor([-0.5, 0.0, 0.5])
    assert arcface_target(cosines, easy_margin=True).tolist() == pytest.approx(
        [-0.5, 0.0, math.cos(math.pi / 3 + 0.5)], abs=1e-6)


def test_margin_lowers_the_target_and_nothing_else():
    generator = torch.Generator().manual_seed(1)
    cosine = torch.rand(64, 5, generator=generator) * 1.98 - 0.99
    labels = torch.randint(5, (64,), generator=generator)
    target = F.one_hot(labels, 5).bool()
    for kind, easy in (("cosface", False), ("arcface", False), ("arcface", True)):
        adjusted = apply_margin(cosine, labels, kind, 0.35 if kind == "cosface" else 0.5,
                                easy_margin=easy)
        assert torch.equal(adjusted[~target], cosine[~target])
        assert bool((adjusted[target] <= cosine[target]).all())
        if not easy:
            assert bool((adjusted[target] < cosine[target]).all())


def test_cross_entropy_value_by_hand():
    logits = toy_head("cosface")(at_angle(60))
    z = [9.6, 64 * math.sqrt(3) / 2, -32.0]
    expected = math.log(sum(math.exp(x) for x in z)) - z[0]
    assert CosFaceLoss()(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)


def test_cosface_is_ldam_with_one_margin():
    generator = torch.Generator().manual_seed(2)
    logits = S * (torch.rand(16, 4, generator=generator) * 2 - 1)
    labels = torch.randint(4, (16,), generator=generator)
    ldam = LDAMLoss([7, 7, 7, 7], max_margin=S * 0.35, scale=1.0)
    assert CosFaceLoss()(logits, labels).item() == pytest.approx(ldam(logits, labels).item(),
                                                                 rel=1e-5)


def test_zero_margin_is_the_plain_cross_entropy():
    generator = torch.Generator().manual_seed(3)
    logits = S * (torch.rand(8, 3, generator=generator) * 2 - 1)
    labels = torch.randint(3, (8,), generator=generator)
    for kind in ("cosface", "arcface"):
        loss = MarginSoftmaxLoss(kind, margin=0.0)(logits, labels)
        assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


@pytest.mark.parametrize("kind,easy", [("cosface", False), ("arcface", False),
                                       ("arcface", True)])
@pytest.mark.parametrize("degrees", [0.0, 180.0])
def test_gradient_is_finite_at_cos_plus_minus_one(kind, easy, degrees):
    head = toy_head(kind, easy_margin=easy)
    v = at_angle(degrees).requires_grad_(True)  # cos θ_0 = +1 (0°) or −1 (180°)
    loss = head.margin_loss()(head(v), torch.tensor([0]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert bool(torch.isfinite(v.grad).all()) and bool(torch.isfinite(head.weight.grad).all())


def test_class_weights_reweight_the_cross_entropy():
    logits = toy_head("cosface")(torch.cat([at_angle(60), at_angle(100)]))
    labels = torch.tensor([0, 1])
    loss = CosFaceLoss()
    trained = loss.margin_logits(logits, labels)
    loss.weight = torch.tensor([3.0, 1.0, 1.0])  # reassigned later, as DRW does
    per_sample = F.cross_entropy(trained, labels, reduction="none")
    expected = (3 * per_sample[0] + per_sample[1]) / 4
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    loss.weight = torch.ones(2)
    with pytest.raises(InputError, match="class weights have 2 entries but the logits have 3"):
        loss(logits, labels)


def test_margin_loss_matches_the_head():
    head = toy_head("arcface", scale=30.0, margin=0.3, easy_margin=True)
    loss = head.margin_loss(label_smoothing=0.1)
    assert (loss.kind, loss.scale, loss.margin, loss.easy_margin) == ("arcface", 30.0, 0.3, True)
    assert loss.ce_kwargs == {"label_smoothing": 0.1}


@pytest.mark.parametrize("make,message", [
    (lambda: MarginSoftmaxLoss("sphereface"), "unknown margin kind"),
    (lambda: MarginSoftmaxLoss("arcface", margin=2.0), "arcface margin must be a number in"),
    (lambda: MarginSoftmaxLoss("cosface", margin=-0.1), "cosface margin must be a number in"),
    (lambda: MarginSoftmaxLoss("cosface", scale=0), "scale must be a finite number > 0"),
    (lambda: MarginSoftmaxLoss("cosface", easy_margin=True), "easy_margin applies to the arcface"),
    (lambda: MarginClassifier(2, 3, kind="arcface", margin="x"), "arcface margin must be"),
])
def test_bad_settings(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_logits_that_are_not_scaled_cosines_are_refused():
    with pytest.raises(InputError, match=r"needs logits s·cos θ .* s = 64; got \|logits\| up to 70"):
        ArcFaceLoss()(torch.tensor([[70.0, 0.0]]), torch.tensor([0]))
    with pytest.raises(InputError, match=r"logits \(B, K\) and labels \(B,\)"):
        ArcFaceLoss()(torch.zeros(2, 3), torch.tensor([0]))
