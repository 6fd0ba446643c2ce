"""Modulated attention (paper §3.2, Eq. 5): ``f_att = f + MA(f) ⊙ SA(f)``.

SA is a non-local block (embedded Gaussian, Wang et al. 2018) and MA a conditional spatial
attention map with a softmax over positions ("attention on attention", Fig. 4). Works for any
feature-map size, unlike the original code's ``Linear(7·7·C → 7·7)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Non-local self-attention, embedded Gaussian: ``SA(f)_p = W_z Σ_q softmax_q(θ_pᵀφ_q) g_q``.

    θ, φ, g are 1×1 convs to ``inter_channels`` (C/2); the softmax logits are not scaled by
    1/√d (as in Wang et al. and the original code). The output conv ``W_z`` back to C has no
    bias, no BatchNorm and a zero init: SA(f) = 0 at init in train and eval mode alike, so the
    block starts as the identity, and no batch statistics are involved (stage 2 may run with a
    frozen backbone and small class-aware batches).
    """

    def __init__(self, channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.inter_channels = inter_channels or max(channels // 2, 1)
        self.theta = nn.Conv2d(channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(channels, self.inter_channels, kernel_size=1)
        self.g = nn.Conv2d(channels, self.inter_channels, kernel_size=1)
        self.out = nn.Conv2d(self.inter_channels, channels, kernel_size=1, bias=False)
        for conv in (self.theta, self.phi, self.g):
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.out.weight)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = f.shape

        def tokens(conv: nn.Conv2d) -> torch.Tensor:  # (B, 1, H·W, C')
            return conv(f).flatten(2).transpose(1, 2).unsqueeze(1)

        context = F.scaled_dot_product_attention(
            tokens(self.theta), tokens(self.phi), tokens(self.g), scale=1.0
        )
        context = context.squeeze(1).transpose(1, 2).reshape(
            batch, self.inter_channels, height, width
        )
        return self.out(context)


class ModulationMap(nn.Module):
    """MA(f): a spatial attention map conditioned on the whole feature map, softmax over H·W.

    The original conditions by a ``Linear(H·W·C → H·W)`` that fixes the map size. Here the
    condition is a query from the globally average-pooled map and the keys are per position:
    ``logit_p = ⟨W_q GAP(f), W_k f_p⟩ / √C'``. (A 1×1 conv on ``[f_p, GAP(f)]`` would not do:
    the GAP part adds the same value at every position and cancels in the softmax.)
    """

    def __init__(self, channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        self.inter_channels = inter_channels or max(channels // 2, 1)
        self.query = nn.Linear(channels, self.inter_channels)
        self.key = nn.Conv2d(channels, self.inter_channels, kernel_size=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, 1, H, W), summing to 1 over the H·W positions of each sample."""
        query = self.query(f.mean(dim=(2, 3)))  # (B, C')
        keys = self.key(f).flatten(2)  # (B, C', H·W)
        logits = torch.einsum("bc,bcp->bp", query, keys) / math.sqrt(self.inter_channels)
        return logits.softmax(dim=1).reshape(f.shape[0], 1, f.shape[2], f.shape[3])


class ModulatedAttention(nn.Module):
    """Eq. 5: ``f_att = f + (H·W)·MA(f) ⊙ SA(f)``; with ``use_modulation=False``: ``f + SA(f)``.

    MA sums to 1 over positions, so it is multiplied by H·W (mean weight 1): the size of the
    added context then does not depend on the map size (the original, fixed at 7×7, leaves the
    factor 1/49 to be absorbed by SA's output conv). The identity at init comes from SA.
    """

    def __init__(self, channels: int, *, use_modulation: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.self_attention = SelfAttention(channels)
        self.modulation = ModulationMap(channels) if use_modulation else None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        context = self.self_attention(f)
        if self.modulation is not None:
            positions = f.shape[2] * f.shape[3]
            context = context * (positions * self.modulation(f))
        return f + context
