"""Open scores from stored logits or features: **higher = more likely open**.

This module is the one place that fixes the score direction (docs/method.md); every detector
here returns a score that grows as the input looks less like a known class, so that
``oltr.metrics.reject`` rejects ``score > threshold`` and ``oltr.metrics.auroc`` treats open as
positive. No model forward happens here: the functions take logits ``(N, K)`` or features
``(N, d)`` and centroids ``(K, d)``.

Each function accepts a ``torch.Tensor`` or a numpy array and returns the same kind (a tensor
stays on its device); :func:`compute_open_score` always returns a float64 numpy array.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from oltr.errors import InputError
from oltr.registry import Registry

TensorOrArray = TypeVar("TensorOrArray", torch.Tensor, np.ndarray)


def _as_float_tensor(name: str, values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A 2-D, finite, floating tensor (half precision is computed in float32)."""
    tensor = torch.as_tensor(values)
    if tensor.ndim != 2:
        raise InputError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise InputError(f"{name} is empty, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    elif tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        row, column = (int(i) for i in torch.nonzero(~finite)[0])
        raise InputError(f"{name} must be finite; entry [{row}, {column}] is not",
                         value=float(tensor[row, column]))
    return tensor


def _like_input(score: torch.Tensor, original: torch.Tensor | np.ndarray) -> Any:
    return score if isinstance(original, torch.Tensor) else score.detach().cpu().numpy()


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise InputError("temperature must be a finite number > 0", value=temperature)
    return temperature


def msp_score(logits: TensorOrArray, temperature: float = 1.0) -> TensorOrArray:
    """1 - max softmax probability (Hendrycks & Gimpel, ICLR 2017; the paper's rule, §4).

    score = 1 - max_k softmax(z / T)_k, computed from the non-top terms (:func:`msp_formula`)
    so that confident inputs keep distinct, accurate scores even when the probability rounds
    to 1.
    """
    temperature = _check_temperature(temperature)
    return _like_input(msp_formula(_as_float_tensor("logits", logits), temperature), logits)


def max_logit_score(logits: TensorOrArray) -> TensorOrArray:
    """-max_k z_k, the negated maximum logit (Hendrycks et al., ICML 2022)."""
    return _like_input(max_logit_formula(_as_float_tensor("logits", logits)), logits)


def energy_score(logits: TensorOrArray, temperature: float = 1.0) -> TensorOrArray:
    """Free energy E(x) = -T logsumexp_k(z_k / T) (Liu et al., NeurIPS 2020)."""
    temperature = _check_temperature(temperature)
    return _like_input(energy_formula(_as_float_tensor("logits", logits), temperature), logits)


def reachability_score(features: TensorOrArray, centroids: TensorOrArray) -> TensorOrArray:
    """Reachability gamma = min_i ||v - c_i||_2 to the visual memory (OLTR, Eq. 3).

    Computed with ``torch.cdist`` (no N x K x d intermediate); far from every centroid means
    more likely open.
    """
    v = _as_float_tensor("features", features)
    c = _as_float_tensor("centroids", centroids)
    if v.shape[1] != c.shape[1]:
        raise InputError(f"features have dimension {v.shape[1]} but centroids have "
                         f"{c.shape[1]}")
    return _like_input(nearest_centroid_distance(v, c), features)


# ------------------------------------------------------------------ the formulas
# Torch operations only, on tensors already checked (finite, 2-D): no checks of values, no
# numpy, no Python branch on the data. The public scores above check their inputs and call
# these; the detectors' ``traceable_score`` (what ``oltr.export`` traces to ONNX) calls them
# without the checks, so each formula has one implementation.


def msp_formula(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``1 − max_k softmax(z / T)_k`` (N,), in the logits' dtype (:func:`msp_score` without its
    checks).

    With ``u = z / T``, ``m = max_k u_k`` at index ``t`` and ``s = Σ_{j≠t} exp(u_j − m)`` (the
    non-top terms only; an entry tied with the top counts exp(0) = 1), ``1 − p_max =
    s / (1 + s)``: no cancellation, so the score stays accurate to a few ulps where ``p_max``
    rounds to 1 (``−expm1(max log_softmax)`` is exactly 0 from a logit gap of ≈ 16.6 in
    float32, ≈ 36.7 in float64). It reaches 0 only where ``s`` underflows (gap > ≈ 103 in
    float32, ≈ 745 in float64).
    """
    scaled = logits / temperature
    top = scaled.argmax(dim=1, keepdim=True)
    others = torch.exp(scaled - scaled.gather(1, top)).scatter(1, top, 0.0).sum(dim=1)
    return others / (1 + others)


def max_logit_formula(logits: torch.Tensor) -> torch.Tensor:
    """``−max_k z_k`` (N,) (:func:`max_logit_score` without its checks)."""
    return -logits.max(dim=1).values


def energy_formula(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``−T · logsumexp_k(z_k / T)`` (N,) (:func:`energy_score` without its checks)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def nearest_centroid_distance(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``min_i ‖v − c_i‖₂`` (N,) in the wider dtype of features (N, d) and centroids (K, d),
    with ``torch.cdist`` (:func:`reachability_score` without its checks)."""
    dtype = torch.promote_types(features.dtype, centroids.dtype)
    return torch.cdist(features.to(dtype),
                       centroids.to(device=features.device, dtype=dtype)).min(dim=1).values


def probability_threshold_to_msp_score(probability: float) -> float:
    """MSP-score threshold equivalent to "reject if max softmax < ``probability``": 1 - p.

    The paper's p = 0.1 (§4) never rejects anything with K <= 10 classes, since the max
    softmax is at least 1/K; prefer ``oltr.metrics.calibrate_threshold`` there.
    """
    probability = float(probability)
    if not 0.0 <= probability <= 1.0:
        raise InputError("probability must lie in [0, 1]", value=probability)
    return 1.0 - probability


@dataclass(frozen=True)
class OpenScore:
    """A registered open score: its function, the arrays it needs, whether it takes T."""

    function: Callable[..., Any]
    inputs: tuple[str, ...]
    takes_temperature: bool


#: The stateless open scores of stored arrays, by name (:func:`compute_open_score`). The
#: detectors of :mod:`oltr.detectors` (one registry, ``oltr.detectors.DETECTORS``, which the
#: config and the evaluation read) wrap these functions; this module sits below them, so this
#: table is its own: each name here is also a detector's, giving the same score
#: (tests/test_registry.py).
OPEN_SCORES: Registry[OpenScore] = Registry(
    "open score", unknown="unknown open score; valid names: {names}")
OPEN_SCORES.register("msp", OpenScore(msp_score, ("logits",), takes_temperature=True))
OPEN_SCORES.register("max_logit", OpenScore(max_logit_score, ("logits",),
                                            takes_temperature=False))
OPEN_SCORES.register("energy", OpenScore(energy_score, ("logits",), takes_temperature=True))
OPEN_SCORES.register("reachability", OpenScore(reachability_score, ("features", "centroids"),
                                               takes_temperature=False))


def compute_open_score(
    name: str,
    *,
    logits: torch.Tensor | np.ndarray | None = None,
    features: torch.Tensor | np.ndarray | None = None,
    centroids: torch.Tensor | np.ndarray | None = None,
    temperature: float | None = None,
) -> np.ndarray:
    """Open score ``name`` (a key of :data:`OPEN_SCORES`) as a float64 numpy array.

    Inputs the score does not use are ignored; a missing one, an unknown name, or a
    temperature given to a score without one raises an ``InputError`` (a ``ValueError``).
    """
    entry = OPEN_SCORES.entry(name)
    given = {"logits": logits, "features": features, "centroids": centroids}
    missing = [input_name for input_name in entry.inputs if given[input_name] is None]
    if missing:
        raise InputError(f"open score {name!r} needs {' and '.join(missing)}")
    arguments = {input_name: given[input_name] for input_name in entry.inputs}
    if temperature is not None:
        if not entry.takes_temperature:
            raise InputError(f"open score {name!r} takes no temperature", value=temperature)
        arguments["temperature"] = temperature
    score = entry.function(**arguments)
    if isinstance(score, torch.Tensor):
        score = score.detach().cpu().numpy()
    return np.asarray(score, dtype=np.float64)
