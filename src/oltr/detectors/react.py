"""ReAct, rectified activations (Sun, Guo & Li, "ReAct: Out-of-distribution Detection With
Rectified Activations", NeurIPS 2021, §3), with the energy score."""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from oltr.detectors.base import ArrayLike, Detector, check_state_shape
from oltr.detectors.head import Head, checked_head
from oltr.errors import InputError
from oltr.openset import _as_float_tensor, energy_formula


def check_percentile(detector: str, percentile: float, *, below_100: bool = False) -> float:
    """``percentile`` as a float in [0, 100] (or [0, 100)), else an ``InputError``."""
    value = float(percentile)
    if not (math.isfinite(value) and 0.0 <= value and (value < 100.0 if below_100
                                                       else value <= 100.0)):
        raise InputError(f"{detector} percentile must lie in [0, 100{')' if below_100 else ']'}",
                         value=percentile)
    return value


def activation_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile (0-d float64) of all entries of ``values``, with
    ``numpy.percentile``'s default linear interpolation between order statistics (as
    OpenOOD's ``np.percentile(activations.flatten(), p)``); no size limit (unlike
    ``torch.quantile``)."""
    flat = values.flatten()
    position = percentile / 100.0 * (flat.numel() - 1)
    lower = math.floor(position)
    upper = min(lower + 1, flat.numel() - 1)
    low = flat.kthvalue(lower + 1).values.double()
    high = flat.kthvalue(upper + 1).values.double()
    return low + (high - low) * (position - lower)


class ReAct(Detector):
    """``score = E(h(min(v, c))) = −logsumexp_k h(min(v, c))_k``: the energy of the head's
    logits after clipping each feature entry at c (Sun et al., §3).

    ``fit(features=...)`` sets c to the ``percentile``-th percentile of all entries of the
    training features (Sun et al. use p = 90 on in-distribution data, as OpenOOD v1.5;
    labels are not used). The clip acts on the pooled direct features v (N, d) — the
    penultimate layer, where Sun et al. and OpenOOD apply it; ``head`` maps them to logits
    (:mod:`oltr.detectors.head`), so for OLTR stage 2 the meta-embedding and cosine
    classifier see the clipped v.

    Args:
        percentile: p in [0, 100].

    Inputs: ``fit(features=(N, d))``, ``score(features=(M, d), head=...)`` with head:
    features → logits (:mod:`oltr.detectors.head`).

    Returns:
        ``score``: (M,) float64, the energy; higher = more likely open.

    Raises:
        InputError: p outside [0, 100]; non-finite features; a head that does not return
            finite logits (M, K).
        NotFittedError: ``score`` or ``state_dict`` before ``fit``.
    """

    name: ClassVar[str] = "react"
    inputs: ClassVar[tuple[str, ...]] = ("features", "head")
    fit_inputs = ("features",)
    options: ClassVar[tuple[str, ...]] = ("percentile",)
    state_names: ClassVar[tuple[str, ...]] = ("threshold",)

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = check_percentile("ReAct", percentile)

    def _fit(self, features: ArrayLike) -> None:
        self.threshold = activation_percentile(_as_float_tensor("features", features),
                                               self.percentile)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_shape(self.name, "threshold", state["threshold"], ())
        self.threshold = state["threshold"]

    def _score(self, features: ArrayLike, head: Head) -> torch.Tensor:
        return self._formula(_as_float_tensor("features", features),
                             checked_head(self.name, head))

    def _formula(self, features: torch.Tensor, head: Head) -> torch.Tensor:
        clipped = features.clamp(max=float(self.threshold))
        return energy_formula(head(clipped).double())
