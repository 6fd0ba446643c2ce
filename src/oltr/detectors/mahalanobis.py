"""Mahalanobis distance to class-conditional Gaussians (Lee, Lee, Lee & Shin, "A Simple
Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
NeurIPS 2018, Eq. 1–2), the feature-space score without input pre-processing or layer
ensembles, as OpenOOD v1.5's ``mds``."""
from __future__ import annotations

from typing import ClassVar

import torch

from oltr.detectors.base import ArrayLike, Detector, as_labels, check_state_shape
from oltr.detectors.covariance import check_estimator, estimate_covariance, precision_matrix
from oltr.errors import InputError
from oltr.openset import _as_float_tensor

MAX_BLOCK_ENTRIES = 1 << 24  #: test rows × classes per distance block (128 MB in float64)


def class_gaussians(
    features: torch.Tensor, labels: torch.Tensor, estimator: str = "empirical"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means μ_k (K, d) and the shared precision Σ⁺ (d, d), float64, with
    ``Σ = (1/N) Σ_i (x_i − μ_{y_i})(x_i − μ_{y_i})ᵀ`` (Lee et al., Eq. 1) or its
    Ledoit–Wolf shrinkage (:mod:`oltr.detectors.covariance`). K = max label + 1.

    Args:
        features: (N, d) training features.
        labels: (N,) int64 labels in 0..K−1.
        estimator: ``empirical`` or ``ledoit_wolf``.

    Raises:
        InputError: a class in 0..K−1 has no training feature.
    """
    x = features.double()
    labels = labels.to(x.device)
    num_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        empty = int(torch.nonzero(counts == 0)[0])
        raise InputError(f"Mahalanobis needs training features of every class "
                         f"0..{num_classes - 1}; class {empty} has none")
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    means = sums.index_add_(0, labels, x) / counts[:, None].to(x.dtype)
    covariance = estimate_covariance(x - means[labels], estimator)
    return means, precision_matrix(covariance)


def mahalanobis_distances(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """Squared Mahalanobis distances ``(x − μ_k)ᵀ P (x − μ_k)`` (N, K), float64.

    Args:
        features: (N, d) queries x.
        means: (K, d) means μ_k.
        precision: (d, d) symmetric P (e.g. Σ⁺).

    Computed as ``xᵀPx − 2 xᵀPμ + μᵀPμ`` after shifting x and μ by the mean of the μ_k (no
    N × K × d intermediate), clamped at 0 against rounding.
    """
    precision = precision.double().to(features.device)
    means = means.double().to(features.device)
    centre = means.mean(dim=0)
    x, mu = features.double() - centre, means - centre
    xp = x @ precision
    return ((xp * x).sum(dim=1, keepdim=True) - 2.0 * xp @ mu.t()
            + ((mu @ precision) * mu).sum(dim=1)).clamp_min(0.0)


def nearest_mahalanobis(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """``min_k (x − μ_k)ᵀ P (x − μ_k)`` (N,), float64, in one block (traceable)."""
    return mahalanobis_distances(features, means, precision).min(dim=1).values


def min_mahalanobis(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """``min_k (x − μ_k)ᵀ P (x − μ_k)`` (N,), float64, computed in blocks of rows."""
    rows = max(1, MAX_BLOCK_ENTRIES // means.shape[0])
    return torch.cat([nearest_mahalanobis(block, means, precision)
                      for block in features.split(rows)])


def check_dimension(detector: str, features: torch.Tensor, dim: int) -> None:
    """An ``InputError`` unless ``features`` (N, d) have d = ``dim``, the fitted dimension."""
    if features.shape[1] != dim:
        raise InputError(f"features have dimension {features.shape[1]} but {detector} was "
                         f"fitted on {dim}")


class Mahalanobis(Detector):
    """``score = min_k (x − μ_k)ᵀ Σ⁻¹ (x − μ_k)`` on the features x (Lee et al., Eq. 2 with the
    sign turned: far from every class = open).

    ``fit(features=..., labels=...)`` on training features: class means μ_k and one shared
    covariance Σ (:func:`class_gaussians`); Σ⁻¹ is the pseudo-inverse (as scikit-learn's and
    OpenOOD's ``precision_``), so with ``covariance="empirical"`` a direction without training
    variance (a dead unit) adds nothing; ``covariance="ledoit_wolf"`` shrinks Σ towards
    ``μ I`` and keeps it invertible. Computed in float64.

    Args:
        covariance: ``empirical`` (Lee et al.) or ``ledoit_wolf``.

    Inputs: ``fit(features=(N, d), labels=(N,))``, ``score(features=(M, d))``.

    Returns:
        ``score``: (M,) float64, >= 0; higher = more likely open.

    Raises:
        InputError: an unknown estimator; a class in 0..K−1 without training features; score
            features of another dimension than the fitted one.
        NotFittedError: ``score`` or ``state_dict`` before ``fit``.
    """

    name: ClassVar[str] = "mahalanobis"
    inputs: ClassVar[tuple[str, ...]] = ("features",)
    fit_inputs = ("features", "labels")
    options: ClassVar[tuple[str, ...]] = ("covariance",)
    state_names: ClassVar[tuple[str, ...]] = ("class_means", "precision")

    def __init__(self, covariance: str = "empirical") -> None:
        self.covariance = check_estimator(covariance)

    def _fit(self, features: ArrayLike, labels: ArrayLike) -> None:
        vectors = _as_float_tensor("features", features)
        labels = as_labels(labels, vectors.shape[0])
        self.class_means, self.precision = class_gaussians(vectors, labels, self.covariance)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"class_means": self.class_means, "precision": self.precision}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_shape(self.name, "class_means", state["class_means"], (None, None))
        dim = state["class_means"].shape[1]
        check_state_shape(self.name, "precision", state["precision"], (dim, dim))
        self.class_means, self.precision = state["class_means"], state["precision"]

    def _score(self, features: ArrayLike) -> torch.Tensor:
        vectors = _as_float_tensor("features", features)
        check_dimension("Mahalanobis", vectors, self.class_means.shape[1])
        return min_mahalanobis(vectors, self.class_means, self.precision)

    def _formula(self, features: torch.Tensor) -> torch.Tensor:
        return nearest_mahalanobis(features, self.class_means, self.precision)
