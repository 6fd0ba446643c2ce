from __future__ import annotations

import pytest
import torch

from oltr.models.attention import ModulatedAttention, ModulationMap, SelfAttention

SHAPES = [(7, 7), (4, 4), (1, 1), (5, 3)]


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("use_modulation", [True, False])
def test_identity_at_init(height, width, use_modulation):
    torch.manual_seed(0)
    block = ModulatedAttention(16, use_modulation=use_modulation)
    f = torch.randn(3, 16, height, width)
    for mode in (True, False):
        block.train(mode)
        assert torch.equal(block(f), f)


@pytest.mark.parametrize("height,width", SHAPES)
def test_modulation_map_is_a_softmax_over_positions(height, width):
    torch.manual_seed(1)
    weights = ModulationMap(16)(torch.randn(4, 16, height, width))
    assert weights.shape == (4, 1, height, width)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(dim=(1, 2, 3)), torch.ones(4))


def test_modulation_map_depends_on_the_whole_map():
    torch.manual_seed(2)
    ma = ModulationMap(8)
    f = torch.randn(1, 8, 3, 3)
    changed = f.clone()
    changed[:, :, 0, 0] += 5.0  # change one position only
    before, after = ma(f), ma(changed)
    # the weights of the untouched positions shift relative to one another: the condition
    # (the pooled map) changed, not only the logit of position (0, 0)
    ratio_before = before[0, 0, 1, 1] / before[0, 0, 2, 2]
    ratio_after = after[0, 0, 1, 1] / after[0, 0, 2, 2]
    assert not torch.isclose(ratio_before, ratio_after)


def _explicit_self_attention(sa: SelfAttention, f: torch.Tensor) -> torch.Tensor:
    """Wang et al.'s embedded Gaussian written out with an explicit softmax."""
    b, _, h, w = f.shape
    theta = sa.theta(f).flatten(2)  # (B, C', N)
    phi = sa.phi(f).flatten(2)
    g = sa.g(f).flatten(2)
    affinity = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)  # (B, N, N), rows sum to 1
    context = (affinity @ g.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
    return sa.out(context)


def test_self_attention_matches_the_explicit_formula():
    torch.manual_seed(3)
    sa = SelfAttention(12)
    torch.nn.init.normal_(sa.out.weight)
    f = torch.randn(2, 12, 5, 3)
    torch.testing.assert_close(sa(f), _explicit_self_attention(sa, f), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_modulation", [True, False])
def test_forward_is_eq5(use_modulation):
    torch.manual_seed(4)
    block = ModulatedAttention(12, use_modulation=use_modulation)
    torch.nn.init.normal_(block.self_attention.out.weight)
    f = torch.randn(2, 12, 4, 5)
    sa = _explicit_self_attention(block.self_attention, f)
    if use_modulation:
        expected = f + 20 * block.modulation(f) * sa  # H·W = 20
    else:
        expected = f + sa
    torch.testing.assert_close(block(f), expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_part_after_one_step():
    torch.manual_seed(5)
    block = ModulatedAttention(8)
    f = torch.randn(4, 8, 3, 3)
    target = torch.randn(4, 8, 3, 3)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)

    def step():
        optimizer.zero_grad()
        ((block(f) - target) ** 2).mean().backward()

    step()
    # at the zero init only the output conv has a gradient
    assert block.self_attention.out.weight.grad.abs().sum() > 0
    assert block.self_attention.theta.weight.grad.abs().sum() == 0
    optimizer.step()
    step()
    parts = {
        "theta": block.self_attention.theta.weight,
        "phi": block.self_attention.phi.weight,
        "g": block.self_attention.g.weight,
        "out": block.self_attention.out.weight,
        "ma_query": block.modulation.query.weight,
        "ma_key": block.modulation.key.weight,
    }
    for name, parameter in parts.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_without_modulation_there_is_no_modulation_map():
    block = ModulatedAttention(8, use_modulation=False)
    assert block.modulation is None
    assert not any("modulation" in name for name, _ in block.named_parameters())
