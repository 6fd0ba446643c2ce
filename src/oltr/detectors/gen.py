"""GEN, generalized entropy (Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based
Out-of-Distribution Detection", CVPR 2023, §3)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from oltr.detectors.base import ArrayLike, Detector
from oltr.errors import InputError
from oltr.openset import _as_float_tensor


def generalized_entropy(logits: torch.Tensor, gamma: float = 0.1, top_m: int = 100) -> torch.Tensor:
    """``G_γ(p) = Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ`` (N,) float64 over the M = min(top_m, K)
    largest softmax probabilities p of each row of ``logits`` (N, K).

    Computed in log space from s = Σ_{i ≠ top} exp(z_i − z_max): the top class has
    ``log p = −log1p(s)`` and ``log(1 − p) = log s − log1p(s)``, the others ``log p_j = z_j −
    z_max − log1p(s)`` and ``log(1 − p_j) = log1p(−p_j)``; so a confident row keeps a
    distinct, positive score where 1 − p rounds to 0 (a logit gap above ~37 in float64).
    """
    z = logits.double()
    top = z.topk(min(int(top_m), z.shape[1]), dim=1).values
    shifted = z - top[:, :1]
    others = shifted.scatter(1, shifted.argmax(dim=1, keepdim=True), -torch.inf).exp().sum(dim=1)
    log_p = top - top[:, :1] - torch.log1p(others)[:, None]
    log_q = torch.log1p(-log_p.exp())
    log_q[:, 0] = torch.log(others) - torch.log1p(others)
    return torch.exp(gamma * (log_p + log_q)).sum(dim=1)


class GEN(Detector):
    """``score = G_γ(softmax(z))`` (:func:`generalized_entropy`) on the logits z; nothing to
    fit. Liu et al. (and OpenOOD v1.5) use γ = 0.1 and M = 100; uncertain rows (flat softmax)
    have a large generalised entropy, confident ones a small one.

    Args:
        gamma: γ > 0.
        top_m: M >= 1, capped at the number of classes K.

    Inputs: ``score(logits=(N, K))``; ``fit`` is a no-op.

    Returns:
        ``score``: (N,) float64 in [0, M · 2^(−2γ)]; higher = more likely open.

    Raises:
        InputError: γ <= 0 or M < 1; non-finite logits.
    """

    name: ClassVar[str] = "gen"
    inputs: ClassVar[tuple[str, ...]] = ("logits",)
    options: ClassVar[tuple[str, ...]] = ("gamma", "top_m")

    def __init__(self, gamma: float = 0.1, top_m: int = 100) -> None:
        gamma = float(gamma)
        if not (math.isfinite(gamma) and gamma > 0):
            raise InputError("GEN gamma must be a finite number > 0", value=gamma)
        if int(top_m) != top_m or top_m < 1:
            raise InputError("GEN top_m must be an integer >= 1", value=top_m)
        self.gamma, self.top_m = gamma, int(top_m)

    def _score(self, logits: ArrayLike) -> torch.Tensor:
        return self._formula(_as_float_tensor("logits", logits))

    def _formula(self, logits: torch.Tensor) -> torch.Tensor:
        return generalized_entropy(logits, self.gamma, self.top_m)
