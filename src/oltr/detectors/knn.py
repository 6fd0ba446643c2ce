"""Deep nearest neighbours (Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep
Nearest Neighbors", ICML 2022)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from oltr.detectors.base import ArrayLike, Detector, check_state_shape
from oltr.errors import InputError
from oltr.openset import _as_float_tensor

_MAX_CHUNK_ENTRIES = 1 << 24  # test rows × train rows per similarity block (64 MB in fp32)


class KNN(Detector):
    """``score = ‖z − z_(k)‖₂``: the distance of the normalised feature z = v/‖v‖ to its k-th
    nearest normalised training feature (Sun et al. use the negative as the known score).

    ``fit(features=...)`` stores the normalised training features (labels are not used).
    Computed blockwise as ``sqrt(2 − 2·cos)`` from the k-th largest cosine, in the inputs'
    precision (float32 gives about 1e-3 absolute error on near-zero distances).
    ``normalize=False``: the plain Euclidean distance of v to its k-th nearest training
    feature — OLTR's reachability (Eq. 3) against the whole training set instead of the class
    centroids (an ablation row of benchmarks/README.md).
    """

    name: ClassVar[str] = "knn"
    inputs: ClassVar[tuple[str, ...]] = ("features",)
    fit_inputs = ("features",)
    options: ClassVar[tuple[str, ...]] = ("k", "normalize")
    state_names: ClassVar[tuple[str, ...]] = ("train_features",)

    def __init__(self, k: int = 1, normalize: bool = True) -> None:
        if int(k) != k or k < 1:
            raise InputError("KNN k must be an integer >= 1", value=k)
        self.k = int(k)
        self.normalize = bool(normalize)

    def _fit(self, features: ArrayLike) -> None:
        vectors = _as_float_tensor("features", features)
        if vectors.shape[0] < self.k:
            raise InputError(f"KNN with k={self.k} needs at least {self.k} training features",
                             value=vectors.shape[0])
        self.train_features = F.normalize(vectors, dim=1) if self.normalize else vectors

    def _state(self) -> dict[str, torch.Tensor]:
        return {"train_features": self.train_features}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_shape(self.name, "train_features", state["train_features"], (None, None))
        if state["train_features"].shape[0] < self.k:
            raise InputError(f"KNN with k={self.k} needs at least {self.k} training features",
                             value=state["train_features"].shape[0])
        self.train_features = state["train_features"]

    def _score(self, features: ArrayLike) -> torch.Tensor:
        vectors = _as_float_tensor("features", features)
        train = self.train_features
        if vectors.shape[1] != train.shape[1]:
            raise InputError(f"features have dimension {vectors.shape[1]} but KNN was fitted "
                             f"on {train.shape[1]}")
        rows = max(1, _MAX_CHUNK_ENTRIES // train.shape[0])
        return torch.cat([self._formula(chunk) for chunk in vectors.split(rows)])

    def _formula(self, features: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(features.dtype, self.train_features.dtype)
        train = self.train_features.to(device=features.device, dtype=dtype)
        if not self.normalize:
            distances = torch.cdist(features.to(dtype), train)
            return distances.topk(self.k, dim=1, largest=False).values[:, -1].double()
        queries = F.normalize(features.to(dtype), dim=1)
        kth_cosine = (queries @ train.t()).topk(self.k, dim=1).values[:, -1]
        return (2.0 - 2.0 * kth_cosine.double()).clamp_min(0).sqrt()
