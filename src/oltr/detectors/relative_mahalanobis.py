"""Relative Mahalanobis distance, RMD (Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple
Fix to Mahalanobis Distance for Improving Near-OOD Detection", arXiv:2106.09022, 2021), as
OpenOOD v1.5's ``rmds`` and pytorch-ood's ``RMD``."""
from __future__ import annotations

from typing import ClassVar

import torch

from oltr.detectors.base import ArrayLike, Detector, as_labels, check_state_shape
from oltr.detectors.covariance import check_estimator, estimate_covariance, precision_matrix
from oltr.detectors.mahalanobis import (
    MAX_BLOCK_ENTRIES,
    check_dimension,
    class_gaussians,
    nearest_mahalanobis,
)
from oltr.openset import _as_float_tensor


class RelativeMahalanobis(Detector):
    """``score = min_k [MD_k(x) − MD_0(x)]`` with ``MD_k(x) = (x − μ_k)ᵀ Σ⁻¹ (x − μ_k)`` the
    class-conditional Mahalanobis distance (:class:`~oltr.detectors.Mahalanobis`) and
    ``MD_0(x) = (x − μ_0)ᵀ Σ_0⁻¹ (x − μ_0)`` that of a background Gaussian fitted on all
    training features, ``μ_0`` their mean and ``Σ_0 = (1/N) Σ_i (x_i − μ_0)(x_i − μ_0)ᵀ``.
    Subtracting MD_0 discounts the directions shared by all known classes (Ren et al.); since
    MD_0 does not depend on k, the score is ``min_k MD_k(x) − MD_0(x)``.

    ``fit(features=..., labels=...)`` on training features; inverses are pseudo-inverses,
    computed in float64.

    Args:
        covariance: ``empirical`` (Ren et al.) or ``ledoit_wolf``, for both Σ and Σ_0.

    Inputs: ``fit(features=(N, d), labels=(N,))``, ``score(features=(M, d))``.

    Returns:
        ``score``: (M,) float64 (may be negative); higher = more likely open.

    Raises:
        InputError: an unknown estimator; a class in 0..K−1 without training features; score
            features of another dimension than the fitted one.
        NotFittedError: ``score`` or ``state_dict`` before ``fit``.
    """

    name: ClassVar[str] = "relative_mahalanobis"
    inputs: ClassVar[tuple[str, ...]] = ("features",)
    fit_inputs = ("features", "labels")
    options: ClassVar[tuple[str, ...]] = ("covariance",)
    state_names: ClassVar[tuple[str, ...]] = ("class_means", "precision", "background_mean",
                                              "background_precision")

    def __init__(self, covariance: str = "empirical") -> None:
        self.covariance = check_estimator(covariance)

    def _fit(self, features: ArrayLike, labels: ArrayLike) -> None:
        vectors = _as_float_tensor("features", features)
        labels = as_labels(labels, vectors.shape[0])
        self.class_means, self.precision = class_gaussians(vectors, labels, self.covariance)
        x = vectors.double()
        self.background_mean = x.mean(dim=0)
        self.background_precision = precision_matrix(
            estimate_covariance(x - self.background_mean, self.covariance))

    def _state(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in self.state_names}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_shape(self.name, "class_means", state["class_means"], (None, None))
        dim = state["class_means"].shape[1]
        for key, shape in (("precision", (dim, dim)), ("background_mean", (dim,)),
                           ("background_precision", (dim, dim))):
            check_state_shape(self.name, key, state[key], shape)
        for key in self.state_names:
            setattr(self, key, state[key])

    def _score(self, features: ArrayLike) -> torch.Tensor:
        vectors = _as_float_tensor("features", features)
        check_dimension("relative Mahalanobis", vectors, self.class_means.shape[1])
        rows = max(1, MAX_BLOCK_ENTRIES // self.class_means.shape[0])
        return torch.cat([self._formula(block) for block in vectors.split(rows)])

    def _formula(self, features: torch.Tensor) -> torch.Tensor:
        background = nearest_mahalanobis(features, self.background_mean[None, :],
                                         self.background_precision)
        return nearest_mahalanobis(features, self.class_means, self.precision) - background
