"""SCALE (Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc
Out-of-distribution Detection Enhancement", ICLR 2024, §3), with the energy score; applied to
the pooled penultimate features as OpenOOD v1.5 does."""
from __future__ import annotations

from typing import ClassVar

import torch

from oltr.detectors.ash import check_activations, kept_count, pruning_ratio
from oltr.detectors.base import ArrayLike, Detector
from oltr.detectors.head import Head, checked_head
from oltr.detectors.react import check_percentile
from oltr.openset import _as_float_tensor, energy_formula


def scale_activations(features: torch.Tensor, percentile: float = 85.0) -> torch.Tensor:
    """SCALE on activation rows (N, d) → ``v · exp(s1 / s2)`` (N, d), float64: every
    activation kept, scaled by ASH-S's factor (s1 = sum of the row, s2 = sum of its k =
    :func:`~oltr.detectors.ash.kept_count` largest entries)."""
    x = features.double()
    kept = x.topk(kept_count(x.shape[1], percentile), dim=1).values
    return x * torch.exp(pruning_ratio(x, kept))[:, None]


class SCALE(Detector):
    """``score = −logsumexp_k h(v · exp(s1/s2))_k``: the energy of the head's logits on the
    scaled features (:func:`scale_activations`); nothing to fit.

    As OpenOOD v1.5, on the pooled penultimate features v (N, d); ``head`` maps them to
    logits (:mod:`oltr.detectors.head`). Default p = 85 (OpenOOD v1.5's setting). Scaling
    each row by one positive factor keeps the arg-max of a linear head without bias.

    Args:
        percentile: p in [0, 100): the share of each row's activations below the cut.

    Inputs: ``score(features=(M, d), head=...)``, features >= 0, head: features → logits
    (:mod:`oltr.detectors.head`); ``fit`` is a no-op.

    Returns:
        ``score``: (M,) float64, the energy; higher = more likely open.

    Raises:
        InputError: p outside [0, 100); negative or non-finite features; a head that does
            not return finite logits (M, K).
    """

    name: ClassVar[str] = "scale"
    inputs: ClassVar[tuple[str, ...]] = ("features", "head")
    options: ClassVar[tuple[str, ...]] = ("percentile",)

    def __init__(self, percentile: float = 85.0) -> None:
        self.percentile = check_percentile("SCALE", percentile, below_100=True)

    def _score(self, features: ArrayLike, head: Head) -> torch.Tensor:
        vectors = _as_float_tensor("features", features)
        check_activations("SCALE", vectors)
        return self._formula(vectors, checked_head(self.name, head))

    def _formula(self, features: torch.Tensor, head: Head) -> torch.Tensor:
        scaled = scale_activations(features, self.percentile).to(features.dtype)
        return energy_formula(head(scaled).double())
