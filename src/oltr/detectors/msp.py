"""Maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified
and Out-of-Distribution Examples in Neural Networks", ICLR 2017; the paper's rule, §4)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from oltr.detectors.base import ArrayLike, Detector
from oltr.openset import msp_formula, msp_score


class MSP(Detector):
    """``score = 1 − max_k softmax(z)_k`` (:func:`oltr.openset.msp_score`); nothing to fit."""

    name: ClassVar[str] = "msp"
    inputs: ClassVar[tuple[str, ...]] = ("logits",)

    def _score(self, logits: ArrayLike) -> torch.Tensor | np.ndarray:
        return msp_score(logits)

    def _formula(self, logits: torch.Tensor) -> torch.Tensor:
        return msp_formula(logits)
