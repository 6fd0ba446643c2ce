"""Covariance and precision estimates of Gaussian feature models (Mahalanobis, relative
Mahalanobis), in float64 torch so they can run on the GPU.

``empirical``: the maximum-likelihood estimate ``Σ = Xᵀ X / n`` of centred rows X (n, d), as
``sklearn.covariance.EmpiricalCovariance(assume_centered=True)``. ``ledoit_wolf``: Ledoit &
Wolf's shrinkage towards ``μ I`` ("A well-conditioned estimator for large-dimensional
covariance matrices", J. Multivariate Anal. 2004), as ``sklearn.covariance.LedoitWolf(
assume_centered=True)`` — invertible even with fewer samples than dimensions or dead units.
"""
from __future__ import annotations

import torch

from oltr.errors import InputError

COVARIANCE_ESTIMATORS = ("empirical", "ledoit_wolf")


def check_estimator(estimator: str) -> str:
    """``estimator`` if it is one of :data:`COVARIANCE_ESTIMATORS`, else an ``InputError``."""
    if estimator not in COVARIANCE_ESTIMATORS:
        raise InputError(f"unknown covariance estimator (valid: "
                         f"{', '.join(COVARIANCE_ESTIMATORS)})", value=estimator)
    return estimator


def empirical_covariance(centred: torch.Tensor) -> torch.Tensor:
    """``Σ = Xᵀ X / n`` (d, d) of centred rows X (n, d), float64."""
    x = centred.double()
    return x.t() @ x / x.shape[0]


def ledoit_wolf_covariance(centred: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit–Wolf shrunk covariance ``(1 − s) Σ + s μ I`` (μ = trace(Σ)/d) of centred rows
    X (n, d) and the shrinkage s ∈ [0, 1]; sklearn's ``ledoit_wolf_shrinkage`` formula
    (Ledoit & Wolf 2004, Lemmas 3.2–3.4). s = 0 for d = 1 or an isotropic Σ."""
    x = centred.double()
    n, d = x.shape
    covariance = empirical_covariance(x)
    mu = torch.trace(covariance) / d
    if d == 1:
        return covariance, 0.0
    squares = x * x
    beta_sum = (squares.t() @ squares).sum()
    delta_sum = (covariance * covariance).sum()
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2.0 * mu * torch.trace(covariance) + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    shrinkage = 0.0 if float(beta) == 0.0 or float(delta) <= 0.0 else float(beta / delta)
    identity = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    return (1.0 - shrinkage) * covariance + shrinkage * mu * identity, shrinkage


def estimate_covariance(centred: torch.Tensor, estimator: str = "empirical") -> torch.Tensor:
    """The ``estimator``'s covariance (d, d), float64, of centred rows (n, d).

    Raises:
        InputError: an unknown ``estimator``.
    """
    if check_estimator(estimator) == "ledoit_wolf":
        return ledoit_wolf_covariance(centred)[0]
    return empirical_covariance(centred)


def precision_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """``Σ⁺``, the pseudo-inverse of a symmetric covariance (d, d) (eigenvalues below
    ``d · eps · λ_max`` dropped), as ``scipy.linalg.pinvh`` and scikit-learn's
    ``precision_``: directions without training variance (dead units) add no distance."""
    return torch.linalg.pinv(covariance.double(), hermitian=True)
