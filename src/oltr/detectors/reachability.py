"""OLTR's reachability (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World",
CVPR 2019, Eq. 3) as an open-set detector, with two richer readings of it."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from oltr.detectors.base import ArrayLike, Detector, as_labels, check_state_shape
from oltr.errors import InputError
from oltr.models.memory import class_means
from oltr.openset import _as_float_tensor, nearest_centroid_distance

KMEANS_ITERATIONS = 25


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, per_class: int,
                     seed: int = 0) -> torch.Tensor:
    """Up to ``per_class`` k-means centres of each class's features (Lloyd's algorithm,
    ``KMEANS_ITERATIONS`` rounds, seeded initialisation from the class's own samples; a class
    with fewer samples keeps them all), stacked: (≤ K·per_class, d)."""
    generator = torch.Generator().manual_seed(seed)
    centres = []
    for label in torch.unique(labels).tolist():
        members = features[labels == label]
        k = min(per_class, members.shape[0])
        if k == members.shape[0]:
            centres.append(members)
            continue
        start = torch.randperm(members.shape[0], generator=generator)[:k].to(members.device)
        current = members[start].clone()
        for _ in range(KMEANS_ITERATIONS):
            assignment = torch.cdist(members, current).argmin(dim=1)
            for j in range(k):
                chosen = members[assignment == j]
                if chosen.shape[0]:
                    current[j] = chosen.mean(dim=0)
        centres.append(current)
    return torch.cat(centres)


class Reachability(Detector):
    """``score = γ = min_i ‖v − c_i‖₂`` (Eq. 3), the distance to the nearest memory entry.

    Either pass ``centroids`` (K, d) — OLTR's learned memory — and ``fit`` is a no-op that
    keeps them, or ``fit(features=..., labels=...)`` stores the class means of the features
    (the memory's initialisation, §3.1; labels must cover 0..K−1). Either way the centroids
    are the detector's state (:meth:`state_dict`), not an option of :meth:`config`.

    Two richer readings (ablation rows of benchmarks/README.md; ``False``/``1`` is the
    published form): ``normalize=True`` measures the distance between unit-length feature and
    centroid, ``‖v/‖v‖ − c/‖c‖‖`` (a cosine distance: the feature norm, which grows with the
    network's confidence for known and open images alike, no longer dominates);
    ``prototypes=P`` > 1 fits P k-means centres per class on the train features
    (:func:`class_prototypes`) instead of one mean, a memory that follows multi-modal classes.
    """

    name: ClassVar[str] = "reachability"
    inputs: ClassVar[tuple[str, ...]] = ("features",)
    options: ClassVar[tuple[str, ...]] = ("normalize", "prototypes")
    state_names: ClassVar[tuple[str, ...]] = ("centroids",)

    def __init__(self, centroids: ArrayLike | None = None, *, normalize: bool = False,
                 prototypes: int = 1) -> None:
        if isinstance(prototypes, bool) or int(prototypes) != prototypes or prototypes < 1:
            raise InputError("reachability prototypes must be an integer >= 1", value=prototypes)
        if centroids is not None and prototypes > 1:
            raise InputError("reachability with several prototypes per class is fitted on train "
                             "features; it takes no given centroids", value=prototypes)
        self.normalize, self.prototypes = bool(normalize), int(prototypes)
        self.centroids = None if centroids is None else _as_float_tensor("centroids", centroids)
        self.fit_inputs = () if centroids is not None else ("features", "labels")

    def _fit(self, features: ArrayLike, labels: ArrayLike) -> None:
        vectors = _as_float_tensor("features", features)
        labels = as_labels(labels, vectors.shape[0]).to(vectors.device)
        if self.prototypes == 1:
            self.centroids = class_means(vectors, labels, int(labels.max()) + 1)
        else:
            self.centroids = class_prototypes(vectors, labels, self.prototypes)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_shape(self.name, "centroids", state["centroids"], (None, None))
        self.centroids = state["centroids"]

    def _score(self, features: ArrayLike) -> torch.Tensor | np.ndarray:
        vectors = _as_float_tensor("features", features)
        if vectors.shape[1] != self.centroids.shape[1]:
            raise InputError(f"features have dimension {vectors.shape[1]} but the memory has "
                             f"{self.centroids.shape[1]}")
        return self._formula(vectors)

    def _formula(self, features: torch.Tensor) -> torch.Tensor:
        centroids = self.centroids
        if self.normalize:
            features, centroids = F.normalize(features, dim=1), F.normalize(centroids, dim=1)
        return nearest_centroid_distance(features, centroids)
