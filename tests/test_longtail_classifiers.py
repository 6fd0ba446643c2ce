"""Competing methods' classifier heads: τ-norm, LWS, FSLwF (issue 4), with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from oltr.errors import InputError
from oltr.models.classifiers import (
    CosineClassifier,
    FSLwFClassifier,
    LearnableWeightScaling,
    LinearClassifier,
    WeightGenerator,
    tau_normalize,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------- τ-norm


def test_tau_zero_leaves_the_weights_unchanged_and_tau_one_gives_unit_rows():
    weight = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tau_normalize(weight, 0.0), weight)
    norms = torch.linalg.vector_norm(tau_normalize(weight, 1.0), dim=1)
    assert torch.allclose(norms, torch.ones(5))


def test_tau_normalize_known_answer():
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.25]])
    # norms 5, 0, 1/4; τ = 1/2 divides by √5 and by 1/2; a zero row stays zero
    expected = torch.tensor([[3 / math.sqrt(5), 4 / math.sqrt(5)], [0.0, 0.0], [0.0, 0.5]])
    assert torch.allclose(tau_normalize(weight, 0.5), expected)
    with pytest.raises(InputError):
        tau_normalize(weight, -1.0)


# ------------------------------------------------------------------------------------ LWS


def test_lws_starts_equal_to_the_wrapped_classifier_and_learns_only_scales():
    torch.manual_seed(0)
    classifier = LinearClassifier(4, 3)
    v = torch.randn(6, 4)
    expected = classifier(v).detach()
    lws = LearnableWeightScaling(classifier)
    assert torch.equal(lws(v), expected)
    assert [name for name, p in lws.named_parameters() if p.requires_grad] == ["scales"]
    lws(v).sum().backward()
    assert classifier.weight.grad is None and lws.scales.grad is not None
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([2.0, 1.0, 0.5]))
    # f_k (w_k·v + b_k): the bias is scaled with its row
    assert torch.allclose(lws(v), expected * torch.tensor([2.0, 1.0, 0.5]))


def test_lws_wraps_a_cosine_classifier_and_rejects_weightless_modules():
    assert LearnableWeightScaling(CosineClassifier(4, 5)).scales.shape == (5,)
    with pytest.raises(InputError):
        LearnableWeightScaling(torch.nn.ReLU())


# ---------------------------------------------------------------------------------- FSLwF


def test_weight_generator_attention_known_answer():
    generator = WeightGenerator(2, attention_scale=1.0)
    prototype = torch.tensor([[1.0, 0.0]])
    base_weights = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e1, e2
    # cosines (1, 0) → attention (σ, 1 − σ) with σ = e / (1 + e)
    sigma = math.e / (1 + math.e)
    attention = generator.attention(prototype, base_weights)
    assert attention.tolist()[0] == pytest.approx([sigma, 1 - sigma])
    # w' = φ_avg ⊙ w_avg + φ_att ⊙ w_att, φ = 1 at init
    assert generator(prototype, base_weights).tolist()[0] == pytest.approx(
        [1 + sigma, 1 - sigma])
    with torch.no_grad():
        generator.phi_avg.copy_(torch.tensor([0.0, 2.0]))
        generator.phi_att.copy_(torch.tensor([3.0, 0.5]))
    assert generator(prototype, base_weights).tolist()[0] == pytest.approx(
        [3 * sigma, 0.5 * (1 - sigma)])


def make_fslwf() -> FSLwFClassifier:
    classifier = FSLwFClassifier(2, 3, tail_classes=[2], scale=10.0)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]))
    return classifier


def test_fslwf_is_a_cosine_classifier_before_prototypes():
    classifier = make_fslwf()
    logits = classifier(torch.tensor([[5.0, 0.0]]))
    assert logits.tolist()[0] == pytest.approx([10.0, 0.0, -10.0])


def test_fslwf_generates_tail_weights_known_answer():
    classifier = make_fslwf()
    features = torch.tensor([[3.0, 0.0], [0.0, 0.5], [7.0, 7.0], [1.0, 1.0]])
    labels = torch.tensor([2, 2, 0, 1])  # only class 2's samples make its prototype
    classifier.update_prototypes(features, labels)
    assert classifier.tail_prototypes.tolist() == [[0.5, 0.5]]
    # the query (1, 1)/√2 is as close to e1 as to e2: attention (1/2, 1/2), w_att = (1/2, 1/2)
    # generated w = (1/2, 1/2) + (1/2, 1/2) = (1, 1); base rows stay learned
    weights = classifier.class_weights()
    assert torch.allclose(weights, torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    logits = classifier(torch.tensor([[5.0, 0.0]]))
    assert logits.tolist()[0] == pytest.approx([10.0, 0.0, 10 / math.sqrt(2)], rel=1e-6)


def test_fslwf_trains_the_generator_and_saves_its_prototypes():
    classifier = make_fslwf()
    classifier.update_prototypes(torch.tensor([[1.0, 2.0]]), torch.tensor([2]))
    classifier(torch.tensor([[1.0, 0.5]])).sum().backward()
    for parameter in (classifier.generator.phi_avg, classifier.generator.phi_att,
                      classifier.generator.query, classifier.scale):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert classifier.weight.grad[2].abs().sum() == 0  # the tail row is generated, not used
    restored = FSLwFClassifier(2, 3, tail_classes=[2])
    restored.load_state_dict(classifier.state_dict())
    v = torch.tensor([[0.3, -1.0]])
    assert torch.allclose(restored(v), classifier(v))


def test_fslwf_rejects_bad_input():
    with pytest.raises(InputError, match="proper subset"):
        FSLwFClassifier(2, 2, tail_classes=[0, 1])
    with pytest.raises(InputError, match="without a sample"):
        make_fslwf().update_prototypes(torch.ones(2, 2), torch.tensor([0, 1]))
