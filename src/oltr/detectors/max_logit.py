"""Maximum logit (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
Settings", ICML 2022)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from oltr.detectors.base import ArrayLike, Detector
from oltr.openset import max_logit_formula, max_logit_score


class MaxLogit(Detector):
    """``score = −max_k z_k`` (:func:`oltr.openset.max_logit_score`); nothing to fit."""

    name: ClassVar[str] = "max_logit"
    inputs: ClassVar[tuple[str, ...]] = ("logits",)

    def _score(self, logits: ArrayLike) -> torch.Tensor | np.ndarray:
        return max_logit_score(logits)

    def _formula(self, logits: torch.Tensor) -> torch.Tensor:
        return max_logit_formula(logits)
