"""OLTR's reachability (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World",
CVPR 2019, Eq. 3) as an open-set detector."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from oltr.detectors.base import ArrayLike, Detector, as_labels, check_state_shape
from oltr.models.memory import class_means
from oltr.openset import _as_float_tensor, nearest_centroid_distance, reachability_score


class Reachability(Detector):
    """``score = γ = min_i ‖v − c_i‖₂`` (Eq. 3; :func:`oltr.openset.reachability_score`).

    Either pass ``centroids`` (K, d) — OLTR's learned memory — and ``fit`` is a no-op that
    keeps them, or ``fit(features=..., labels=...)`` stores the class means of the features
    (the memory's initialisation, §3.1); labels must cover 0..K−1. Either way the centroids
    are the detector's state (:meth:`state_dict`), not an option of :meth:`config`.
    """

    name: ClassVar[str] = "reachability"
    inputs: ClassVar[tuple[str, ...]] = ("features",)
    state_names: ClassVar[tuple[str, ...]] = ("centroids",)

    def __init__(self, centroids: ArrayLike | None = None) -> None:
        self.centroids = None if centroids is None else _as_float_tensor("centroids", centroids)
        self.fit_inputs = () if centroids is not None else ("features", "labels")

    def _fit(self, features: ArrayLike, labels: ArrayLike) -> None:
        vectors = _as_float_tensor("features", features)
        labels = as_labels(labels, vectors.shape[0]).to(vectors.device)
        self.centroids = class_means(vectors, labels, int(labels.max()) + 1)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_shape(self.name, "centroids", state["centroids"], (None, None))
        self.centroids = state["centroids"]

    def _score(self, features: ArrayLike) -> torch.Tensor | np.ndarray:
        return reachability_score(features, self.centroids)

    def _formula(self, features: torch.Tensor) -> torch.Tensor:
        return nearest_centroid_distance(features, self.centroids)
