"""Energy score (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection",
NeurIPS 2020, Eq. 7)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from oltr.detectors.base import ArrayLike, Detector
from oltr.openset import _check_temperature, energy_formula, energy_score


class Energy(Detector):
    """``score = E(x) = −T · logsumexp_k(z_k / T)`` (:func:`oltr.openset.energy_score`);
    nothing to fit. Liu et al. use T = 1."""

    name: ClassVar[str] = "energy"
    inputs: ClassVar[tuple[str, ...]] = ("logits",)
    options: ClassVar[tuple[str, ...]] = ("temperature",)

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _check_temperature(temperature)

    def _score(self, logits: ArrayLike) -> torch.Tensor | np.ndarray:
        return energy_score(logits, self.temperature)

    def _formula(self, logits: torch.Tensor) -> torch.Tensor:
        return energy_formula(logits, self.temperature)
