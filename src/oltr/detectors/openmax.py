"""OpenMax (Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016, Alg. 1–2)."""
from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch
from scipy.stats import weibull_min

from oltr.detectors.base import ArrayLike, Detector, as_labels, check_state_shape
from oltr.errors import InputError
from oltr.openset import _as_float_tensor

OPENMAX_DISTANCES = ("euclidean", "eucos")


def openmax_distances(
    activations: torch.Tensor | np.ndarray, mean_activations: torch.Tensor | np.ndarray,
    distance: str = "euclidean",
) -> torch.Tensor | np.ndarray:
    """Distances (N, K) of activation vectors (N, K) to the class means (K, K), float64 (a
    numpy array for numpy activations, else a tensor).

    ``euclidean``: ‖v − μ_k‖ (``torch.cdist`` without the matrix-product shortcut: exact like
    ``scipy.spatial.distance.cdist``); ``eucos``: ‖v − μ_k‖ / 200 + (1 − cos(v, μ_k)), the
    authors' code's choice for ImageNet. Torch operations only (traceable).
    """
    if distance not in OPENMAX_DISTANCES:
        raise InputError(f"unknown OpenMax distance (valid: {', '.join(OPENMAX_DISTANCES)})",
                         value=distance)
    v = torch.as_tensor(activations).double()
    means = torch.as_tensor(mean_activations).to(device=v.device, dtype=torch.float64)
    result = torch.cdist(v, means, compute_mode="donot_use_mm_for_euclid_dist")
    if distance == "eucos":
        norms = v.norm(dim=1)[:, None] * means.norm(dim=1)[None, :]
        cosine = (v @ means.t()) / norms.clamp_min(torch.finfo(torch.float64).tiny)
        result = result / 200.0 + (1.0 - cosine)
    return result if isinstance(activations, torch.Tensor) else result.numpy()


def fit_weibull_tail(distances: np.ndarray, tail_size: int) -> tuple[float, float]:
    """Weibull (shape κ, scale λ; location fixed at 0) fitted by maximum likelihood to the
    positive ones among the ``tail_size`` largest ``distances``, as they are
    (``scipy.stats.weibull_min.fit(tail, floc=0)``): the role of Alg. 1's FitHigh, but not
    libMR's ``FitHigh``, which shifts the tail so that its smallest value sits at
    ``translate_amount`` (10000 by default) before its own two-parameter fit — a Weibull
    located at ``smallest − translate_amount``, not at 0. Its CDF is :func:`weibull_cdf`.

    A tail with fewer than two distinct positive distances (a class with one or two samples)
    cannot be fitted; it gets the exponential (κ = 1) with λ = the mean positive tail
    distance, or the smallest positive float when all distances are 0.
    """
    tail = np.sort(np.asarray(distances, dtype=np.float64))[-tail_size:]
    tail = tail[tail > 0]
    if np.unique(tail).size < 2:
        return 1.0, float(tail.mean()) if tail.size else float(np.finfo(np.float64).tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shape, _, scale = weibull_min.fit(tail, floc=0.0)
    return float(shape), float(scale)


def weibull_cdf(x: torch.Tensor, shape: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``1 − exp(−(x/λ)^κ)`` for x >= 0 (``scipy.stats.weibull_min.cdf(x, κ, scale=λ)``,
    location 0), as ``−expm1(−(x/λ)^κ)``."""
    return -torch.expm1(-torch.pow(x / scale, shape))


def openmax_recalibration(
    logits: torch.Tensor,
    mean_activations: torch.Tensor,
    shapes: torch.Tensor,
    scales: torch.Tensor,
    alpha: int,
    distance: str = "euclidean",
) -> torch.Tensor:
    """OpenMax recalibration (Alg. 2) of activation vectors (N, K) → probabilities
    (N, K + 1), float64, the unknown class **last**; torch operations only (traceable).

    For the α top-ranked classes of each activation vector v (rank r = 0 … α − 1):
    ``ω_k = 1 − ((α − r)/α) · WeibullCDF_k(dist(v, μ_k))``, ω = 1 elsewhere;
    ``v̂ = v ⊙ ω``, ``v̂_unknown = Σ_k v_k (1 − ω_k)``; ``P = softmax(v̂, v̂_unknown)``.
    The rank weights (α − r)/α follow the authors' code (the top class gets weight 1); equal
    logits are ranked by class index (a stable sort).
    """
    v = logits.double()
    num_classes = v.shape[1]
    means = mean_activations.to(device=v.device, dtype=torch.float64)
    cdf = weibull_cdf(openmax_distances(v, means, distance),
                      shapes.to(device=v.device, dtype=torch.float64)[None, :],
                      scales.to(device=v.device, dtype=torch.float64)[None, :])
    alpha = min(int(alpha), num_classes)
    # the rank weight of each class: (α − r)/α for the class of rank r < α, 0 for the others;
    # ranks by α arg-max passes (torch and ONNX take the first of equal maxima: a stable sort,
    # without a K-wide sort, which ONNX export lacks)
    weights = torch.zeros_like(v)
    remaining = v
    for rank in range(alpha):
        top = remaining.argmax(dim=1, keepdim=True)
        weights = weights.scatter(1, top, (alpha - rank) / alpha)
        remaining = remaining.scatter(1, top, -torch.inf)
    omega = 1.0 - weights * cdf
    revised = v * omega
    unknown = (v - revised).sum(dim=1, keepdim=True)
    return torch.softmax(torch.cat([revised, unknown], dim=1), dim=1)


def openmax_probabilities(
    logits: np.ndarray,
    mean_activations: np.ndarray,
    shapes: np.ndarray,
    scales: np.ndarray,
    alpha: int,
    distance: str = "euclidean",
) -> np.ndarray:
    """:func:`openmax_recalibration` on numpy arrays → probabilities (N, K + 1), float64,
    the unknown class **last**."""
    return openmax_recalibration(
        torch.as_tensor(np.asarray(logits, dtype=np.float64)),
        torch.as_tensor(np.asarray(mean_activations, dtype=np.float64)),
        torch.as_tensor(np.asarray(shapes, dtype=np.float64)),
        torch.as_tensor(np.asarray(scales, dtype=np.float64)), alpha, distance).numpy()


class OpenMax(Detector):
    """``score = P(unknown | x)`` of :func:`openmax_probabilities` on the logits (the
    activation vectors, AV).

    ``fit(logits=..., labels=...)`` on training data (Alg. 1): per class, the mean activation
    vector μ_k of the correctly classified samples (all of the class' samples when none is
    correct) and a Weibull fit to the ``tail_size`` largest distances to μ_k. ``alpha`` (the
    number of top classes recalibrated; 10 in the paper) is capped at K.
    """

    name: ClassVar[str] = "openmax"
    inputs: ClassVar[tuple[str, ...]] = ("logits",)
    fit_inputs = ("logits", "labels")
    options: ClassVar[tuple[str, ...]] = ("tail_size", "alpha", "distance")
    state_names: ClassVar[tuple[str, ...]] = ("mean_activations", "shapes", "scales")

    def __init__(self, tail_size: int = 20, alpha: int = 10, distance: str = "euclidean") -> None:
        if int(tail_size) != tail_size or tail_size < 1:
            raise InputError("OpenMax tail_size must be an integer >= 1", value=tail_size)
        if int(alpha) != alpha or alpha < 1:
            raise InputError("OpenMax alpha must be an integer >= 1", value=alpha)
        if distance not in OPENMAX_DISTANCES:
            raise InputError(f"unknown OpenMax distance (valid: {', '.join(OPENMAX_DISTANCES)})",
                             value=distance)
        self.tail_size, self.alpha, self.distance = int(tail_size), int(alpha), distance

    def _fit(self, logits: ArrayLike, labels: ArrayLike) -> None:
        activations = _as_float_tensor("logits", logits).double().cpu().numpy()
        labels = as_labels(labels, len(activations)).cpu().numpy()
        num_classes = activations.shape[1]
        if labels.max() >= num_classes:
            raise InputError(f"labels must lie in 0..{num_classes - 1}", value=int(labels.max()))
        predictions = activations.argmax(axis=1)
        self.mean_activations = np.empty((num_classes, num_classes))
        self.shapes, self.scales = np.empty(num_classes), np.empty(num_classes)
        for label in range(num_classes):
            members = labels == label
            if not members.any():
                raise InputError(f"OpenMax needs training samples of every class; class "
                                 f"{label} has none")
            correct = members & (predictions == label)
            chosen = activations[correct if correct.any() else members]
            self.mean_activations[label] = chosen.mean(axis=0)
            distances = openmax_distances(chosen, self.mean_activations[label:label + 1],
                                          self.distance)[:, 0]
            self.shapes[label], self.scales[label] = fit_weibull_tail(distances, self.tail_size)

    def _state(self) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(getattr(self, key)) for key in self.state_names}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        means = state["mean_activations"]
        num_classes = means.shape[0] if means.ndim else 0
        for key, shape in (("mean_activations", (num_classes, num_classes)),
                           ("shapes", (num_classes,)), ("scales", (num_classes,))):
            check_state_shape(self.name, key, state[key], shape)
            setattr(self, key, state[key].double().numpy())

    def _score(self, logits: ArrayLike) -> np.ndarray:
        activations = _as_float_tensor("logits", logits).double().cpu().numpy()
        if activations.shape[1] != self.mean_activations.shape[0]:
            raise InputError(f"logits have {activations.shape[1]} classes but OpenMax was "
                             f"fitted on {self.mean_activations.shape[0]}")
        return self._formula(torch.from_numpy(activations))

    def _formula(self, logits: torch.Tensor) -> torch.Tensor:
        state = [torch.from_numpy(getattr(self, key)) for key in self.state_names]
        return openmax_recalibration(logits, *state, self.alpha, self.distance)[:, -1]
