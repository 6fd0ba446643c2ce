"""ASH, activation shaping (Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation
Shaping for Out-of-Distribution Detection", ICLR 2023, §3), with the energy score;
applied to the pooled penultimate features as OpenOOD v1.5 does."""
from __future__ import annotations

from typing import ClassVar

import torch

from oltr.detectors.base import ArrayLike, Detector
from oltr.detectors.head import Head, checked_head
from oltr.detectors.react import check_percentile
from oltr.errors import InputError
from oltr.openset import _as_float_tensor, energy_formula

ASH_VARIANTS = ("s", "b", "p")


def kept_count(dim: int, percentile: float) -> int:
    """How many of ``dim`` activations survive pruning at ``percentile``:
    ``dim − round(dim · p / 100)`` (the ASH authors' and OpenOOD's rule), at least 1."""
    return max(1, dim - round(dim * percentile / 100.0))


def check_activations(detector: str, features: torch.Tensor) -> None:
    """An ``InputError`` unless every feature entry is >= 0 (activations after a ReLU, which
    ASH's and SCALE's sums assume)."""
    if bool((features < 0).any()):
        row, column = (int(i) for i in torch.nonzero(features < 0)[0])
        raise InputError(f"{detector} needs non-negative activations (features after a ReLU); "
                         f"entry [{row}, {column}] is negative", value=float(features[row, column]))


def pruning_ratio(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``s1 / s2`` (N,) float64: the sum of all activations over the sum of the kept ones
    (1 for an all-zero row)."""
    total, kept_sum = features.double().sum(dim=1), kept.double().sum(dim=1)
    return torch.where(kept_sum > 0, total, 1.0) / torch.where(kept_sum > 0, kept_sum, 1.0)


def ash(features: torch.Tensor, percentile: float = 90.0, variant: str = "s") -> torch.Tensor:
    """ASH on activation rows (N, d) → shaped rows (N, d), float64.

    Keep the k = :func:`kept_count` largest activations of each row, zero the rest, then
    ``s`` (ASH-S): scale the kept ones by ``exp(s1 / s2)``; ``b`` (ASH-B): set each kept one to
    ``s1 / k``; ``p`` (ASH-P): leave them (s1 = sum of the row, s2 = sum of the kept ones).
    Ties at the k-th value are broken by ``torch.topk``.

    Raises:
        InputError: an unknown ``variant``.
    """
    if variant not in ASH_VARIANTS:
        raise InputError(f"unknown ASH variant (valid: {', '.join(ASH_VARIANTS)})", value=variant)
    x = features.double()
    values, index = x.topk(kept_count(x.shape[1], percentile), dim=1)
    if variant == "s":
        values = values * torch.exp(pruning_ratio(x, values))[:, None]
    elif variant == "b":
        values = (x.sum(dim=1) / values.shape[1])[:, None].expand_as(values)
    return torch.zeros_like(x).scatter_(1, index, values)


class ASH(Detector):
    """``score = −logsumexp_k h(ASH(v))_k``: the energy of the head's logits on the shaped
    features (:func:`ash`); nothing to fit.

    Djurisic et al. shape the last feature map before pooling; OpenOOD v1.5 (whose
    leaderboard this follows) shapes the pooled penultimate features v (N, d), as here —
    ``head`` maps them to logits (:mod:`oltr.detectors.head`). Defaults: ASH-S, the paper's
    recommended variant, with p = 90 (the paper's ImageNet setting); OpenOOD v1.5's ``ash``
    row is ASH-B at p = 90 (its ``ash_net`` calls ``ash_b``): ``ASH(variant="b")``.

    Args:
        percentile: p in [0, 100): the share of each row's activations pruned.
        variant: ``s`` (default), ``b`` or ``p``.

    Inputs: ``score(features=(M, d), head=...)``, features >= 0, head: features → logits
    (:mod:`oltr.detectors.head`); ``fit`` is a no-op.

    Returns:
        ``score``: (M,) float64, the energy; higher = more likely open.

    Raises:
        InputError: p outside [0, 100) or an unknown variant; negative or non-finite
            features; a head that does not return finite logits (M, K).
    """

    name: ClassVar[str] = "ash"
    inputs: ClassVar[tuple[str, ...]] = ("features", "head")
    options: ClassVar[tuple[str, ...]] = ("percentile", "variant")

    def __init__(self, percentile: float = 90.0, variant: str = "s") -> None:
        self.percentile = check_percentile("ASH", percentile, below_100=True)
        if variant not in ASH_VARIANTS:
            raise InputError(f"unknown ASH variant (valid: {', '.join(ASH_VARIANTS)})",
                             value=variant)
        self.variant = variant

    def _score(self, features: ArrayLike, head: Head) -> torch.Tensor:
        vectors = _as_float_tensor("features", features)
        check_activations("ASH", vectors)
        return self._formula(vectors, checked_head(self.name, head))

    def _formula(self, features: torch.Tensor, head: Head) -> torch.Tensor:
        shaped = ash(features, self.percentile, self.variant).to(features.dtype)
        return energy_formula(head(shaped).double())
