from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oltr.errors import InputError
from oltr.models.classifiers import CosineClassifier, LinearClassifier, squash


def test_squash_known_answers():
    v = torch.tensor([[3.0, 4.0]])  # norm 5, direction (0.6, 0.8)
    direction = torch.tensor([[0.6, 0.8]])
    torch.testing.assert_close(squash(v, "paper"), 25 / 26 * direction)
    torch.testing.assert_close(squash(v, "original"), 5 / 6 * direction)


def test_squash_lengths_follow_the_formulas():
    v = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    n = v.norm(dim=1)
    torch.testing.assert_close(squash(v, "paper").norm(dim=1), n**2 / (1 + n**2))
    torch.testing.assert_close(squash(v, "original").norm(dim=1), n / (1 + n))


@pytest.mark.parametrize("form", ["paper", "original"])
def test_squash_is_safe_at_zero(form):
    v = torch.zeros(2, 4, requires_grad=True)
    out = squash(v, form)
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.isfinite(v.grad).all()


def test_squash_rejects_unknown_form():
    with pytest.raises(InputError, match="squash form"):
        squash(torch.ones(1, 2), "capsule")


def test_cosine_classifier_known_answer():
    clf = CosineClassifier(2, 3, scale=16.0)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    logits = clf(torch.tensor([[3.0, 4.0]]))
    expected = 16 * 25 / 26 * torch.tensor([[0.6, 0.8, 1.4 / math.sqrt(2)]])
    torch.testing.assert_close(logits, expected)


def test_cosine_classifier_original_squash_and_no_bias():
    clf = CosineClassifier(2, 1, scale=2.0, squash_form="original")
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[0.0, 5.0]]))
    torch.testing.assert_close(clf(torch.tensor([[3.0, 4.0]])), torch.tensor([[2 * 5 / 6 * 0.8]]))
    assert [name for name, _ in clf.named_parameters()] == ["weight"]
    assert clf(torch.zeros(1, 2)).abs().max() == 0  # no bias: v = 0 gives zero logits


def test_small_embeddings_give_flat_logits():
    clf = CosineClassifier(8, 5)
    v = torch.randn(4, 8)
    small, large = clf(v * 1e-3), clf(v * 1e3)
    assert small.softmax(1).max() < 0.21  # ≈ 1/5: no confident class
    assert large.abs().max() > 100 * small.abs().max()


def test_learnable_scale_gets_a_gradient_and_state_dicts_match():
    fixed = CosineClassifier(4, 3, scale=10.0)
    learned = CosineClassifier(4, 3, scale=10.0, learn_scale=True)
    assert set(fixed.state_dict()) == set(learned.state_dict()) == {"weight", "scale"}
    learned(torch.randn(2, 4)).sum().backward()
    assert learned.scale.grad is not None
    learned.load_state_dict(fixed.state_dict())
    assert learned.scale.item() == 10.0


def test_cosine_classifier_rejects_bad_arguments():
    with pytest.raises(InputError):
        CosineClassifier(4, 3, squash_form="bad")
    with pytest.raises(InputError):
        CosineClassifier(4, 3, scale=0.0)


def test_linear_classifier_is_a_linear_layer_with_bias():
    clf = LinearClassifier(6, 4)
    assert isinstance(clf, nn.Linear) and clf.bias is not None
    assert clf.weight.shape == (4, 6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(clf(x), x @ clf.weight.t() + clf.bias)
