from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oltr.errors import InputError
from oltr.models.memory import MetaEmbedding, class_means, reachability


def test_reachability_known_answer():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    centroids = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # row 0: distances 1, 2, 3; row 1: sqrt(20), sqrt(13), 4
    torch.testing.assert_close(reachability(features, centroids), torch.tensor([1.0, 13**0.5]))


def test_reachability_matches_brute_force_on_larger_inputs():
    rng = np.random.default_rng(0)
    features, centroids = rng.normal(size=(100, 16)), rng.normal(size=(50, 16))
    expected = np.linalg.norm(features[:, None] - centroids[None], axis=2).min(axis=1)
    got = reachability(torch.tensor(features, dtype=torch.float32),
                       torch.tensor(centroids, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_reachability_rejects_mismatched_dims():
    with pytest.raises(InputError):
        reachability(torch.zeros(2, 3), torch.zeros(4, 5))


def test_class_means_equal_numpy_means():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(60, 5)).astype(np.float32)
    labels = np.concatenate([np.arange(4), rng.integers(0, 4, size=56)])
    got = class_means(torch.tensor(features), torch.tensor(labels), 4)
    expected = np.stack([features[labels == k].mean(axis=0) for k in range(4)])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32


def test_class_means_name_the_empty_classes():
    with pytest.raises(InputError, match=r"2 classes have no sample \(first: \[1, 3\]\)"):
        class_means(torch.zeros(3, 2), torch.tensor([0, 2, 2]), 4)
    with pytest.raises(InputError, match="0..3"):
        class_means(torch.zeros(2, 2), torch.tensor([0, 4]), 4)


def _toy_memory(**switches) -> MetaEmbedding:
    """2 classes in 2-d: c0 = (1, 0), c1 = (0, 1); o = (0.75, 0.25); e = (0.5, -0.5)."""
    memory = MetaEmbedding(2, 2, **switches)
    memory.init_centroids(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with torch.no_grad():
        if memory.hallucinator is not None:
            memory.hallucinator.weight.zero_()
            memory.hallucinator.bias.copy_(torch.tensor([math.log(3.0), 0.0]))
        if memory.selector is not None:
            memory.selector.weight.zero_()
            memory.selector.bias.copy_(torch.tensor([math.atanh(0.5), math.atanh(-0.5)]))
    return memory


V = torch.tensor([[3.0, 0.0]])  # γ = min(‖(2, 0)‖, ‖(3, -1)‖) = 2, so s/γ = 10/2 = 5


def test_meta_embedding_hand_computed():
    out = _toy_memory()(V)
    torch.testing.assert_close(out["coefficients"], torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(out["memory"], torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(out["selector"], torch.tensor([[0.5, -0.5]]))
    torch.testing.assert_close(out["reachability"], torch.tensor([2.0]))
    # (s/γ)·(v + e ⊙ v_memory) = 5 · ((3, 0) + (0.375, -0.125))
    torch.testing.assert_close(out["meta"], torch.tensor([[16.875, -0.625]]))


@pytest.mark.parametrize(
    "switches,expected",
    [
        ({"use_selector": False}, [[18.75, 1.25]]),  # 5 · ((3, 0) + (0.75, 0.25))
        ({"use_memory": False}, [[15.0, 0.0]]),  # 5 · (3, 0)
        ({"use_reachability": False}, [[3.375, -0.125]]),  # v + e ⊙ v_memory, no s, no 1/γ
        ({"reachability_scale": 1.0}, [[3.375 / 2, -0.125 / 2]]),  # the paper's 1/γ
    ],
)
def test_ablation_switches(switches, expected):
    out = _toy_memory(**switches)(V)
    torch.testing.assert_close(out["meta"], torch.tensor(expected))
    torch.testing.assert_close(out["reachability"], torch.tensor([2.0]))


def test_ablations_remove_unused_modules():
    no_memory = MetaEmbedding(4, 3, use_memory=False)
    assert no_memory.hallucinator is None and no_memory.selector is None
    out = no_memory(torch.randn(2, 4))
    assert out["memory"] is None and out["selector"] is None and out["coefficients"] is None
    no_selector = MetaEmbedding(4, 3, use_selector=False)
    assert no_selector.selector is None and no_selector(torch.randn(2, 4))["selector"] is None


def test_reachability_guard_at_a_centroid():
    out = _toy_memory()(torch.tensor([[1.0, 0.0]]))  # γ = 0
    assert torch.isfinite(out["meta"]).all()


def test_gradients_reach_hallucinator_selector_and_centroids():
    torch.manual_seed(0)
    memory = MetaEmbedding(6, 4, learn_reachability_scale=True)
    memory.init_centroids(torch.randn(4, 6))
    memory(torch.randn(5, 6))["meta"].pow(2).sum().backward()
    for name in ("hallucinator.weight", "selector.weight", "centroids", "reachability_scale"):
        grad = memory.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_init_centroids_and_hallucinator():
    memory = MetaEmbedding(3, 2)
    assert not memory.initialized
    with pytest.raises(InputError, match="shape"):
        memory.init_centroids(torch.zeros(3, 3))
    memory.init_centroids(torch.ones(2, 3))
    assert memory.initialized and torch.equal(memory.centroids.data, torch.ones(2, 3))
    restored = MetaEmbedding(3, 2)
    restored.load_state_dict(memory.state_dict())
    assert restored.initialized
    linear = torch.nn.Linear(3, 2)
    memory.init_hallucinator_from(linear)
    assert torch.equal(memory.hallucinator.weight, linear.weight)
    assert torch.equal(memory.hallucinator.bias, linear.bias)
    with pytest.raises(InputError, match="Linear"):
        memory.init_hallucinator_from(torch.nn.Linear(3, 5))
