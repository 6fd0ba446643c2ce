"""ODIN (Liang, Li & Srikant, "Enhancing the Reliability of Out-of-distribution Image
Detection in Neural Networks", ICLR 2018): temperature scaling (Eq. 1) and a small input
perturbation (Eq. 2) before the maximum softmax probability."""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from oltr.detectors.base import ArrayLike, Detector
from oltr.errors import InputError
from oltr.openset import _check_temperature, msp_formula, msp_score


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise InputError("ODIN epsilon must be a finite number >= 0", value=epsilon)
    return epsilon


def odin_perturb(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    temperature: float = 1000.0,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """ODIN's input pre-processing (Eq. 2): ``x̃ = x − ε · sign(−∇_x log S_ŷ(x; T))``.

    ``S(x; T) = softmax(model_fn(x) / T)`` and ŷ its arg-max: one gradient step that makes
    the predicted class more confident (more so for known inputs than for open ones). ε = 0
    returns ``images`` (detached) without a forward pass. ``model_fn`` maps images to logits
    (put the model in eval mode first); ε is in the units of ``images`` (Liang et al. divide
    the step by the normalisation std per channel when images are normalised outside the
    model). Returns a new detached tensor; the model's ``.grad`` fields are not touched.
    """
    temperature, epsilon = _check_temperature(temperature), _check_epsilon(epsilon)
    if epsilon == 0.0:
        return images.detach()
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model_fn(inputs)
        if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
            raise InputError("model_fn must return logits (N, K)", value=tuple(logits.shape))
        negative_log_confidence = F.cross_entropy(  # −log S_ŷ(x; T), summed over the batch
            logits.float() / temperature, logits.argmax(dim=1), reduction="sum")
        (gradient,) = torch.autograd.grad(negative_log_confidence, inputs)
    return (inputs - epsilon * gradient.sign()).detach()


class ODIN(Detector):
    """``score = 1 − max_k softmax(z̃ / T)_k`` with z̃ the logits of the perturbed input
    (:func:`odin_perturb`; Liang et al. use T = 1000); nothing to fit.

    Detectors work on stored logits: with ε > 0, compute them on ``detector.perturb(model_fn,
    images)``; with ε = 0 the plain logits are the right ones. T = 1, ε = 0 is :class:`MSP`.
    """

    name: ClassVar[str] = "odin"
    inputs: ClassVar[tuple[str, ...]] = ("logits",)
    options: ClassVar[tuple[str, ...]] = ("temperature", "epsilon")

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0) -> None:
        self.temperature = _check_temperature(temperature)
        self.epsilon = _check_epsilon(epsilon)

    def perturb(
        self, model_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor:
        """:func:`odin_perturb` with this detector's T and ε."""
        return odin_perturb(model_fn, images, self.temperature, self.epsilon)

    def _score(self, logits: ArrayLike) -> torch.Tensor | np.ndarray:
        return msp_score(logits, self.temperature)

    def export_refusal(self) -> str | None:
        if self.epsilon > 0:
            return (f"ODIN's input perturbation (epsilon {self.epsilon:g} > 0) takes the gradient "
                    "of the network's softmax with respect to the input image, which an ONNX "
                    "inference graph cannot compute; export ODIN with epsilon 0 (temperature "
                    "scaling only) or another open score")
        return None

    def _formula(self, logits: torch.Tensor) -> torch.Tensor:
        return msp_formula(logits, self.temperature)
