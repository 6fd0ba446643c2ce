"""The one interface of every open-set detector: ``fit`` where something is learned, then
``score``; **higher = more likely open** (DESIGN.md §1, the direction of :mod:`oltr.openset`).

Detectors work on stored logits ``(N, K)`` and/or features ``(N, d)`` (torch tensors or numpy
arrays), so many detectors cost one forward pass. Inputs a detector does not use are
ignored, so a caller may pass everything it has to every detector.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from oltr.errors import InputError, OltrError

ArrayLike = torch.Tensor | np.ndarray


class NotFittedError(OltrError, RuntimeError):
    """A detector that learns from training data was asked to score before ``fit``."""


def as_labels(labels: ArrayLike, length: int) -> torch.Tensor:
    """Class labels as a 1-D int64 tensor of ``length`` entries, all >= 0."""
    tensor = torch.as_tensor(labels)
    if tensor.ndim != 1 or tensor.shape[0] != length:
        raise InputError(f"labels must be 1-D with {length} entries (one per sample)",
                         value=tuple(tensor.shape))
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise InputError(f"labels must hold integers, got {tensor.dtype}")
    if bool((tensor < 0).any()):
        raise InputError("labels must be >= 0 (known classes only)", value=int(tensor.min()))
    return tensor.long()


class Detector(ABC):
    """An open-set detector. ``score`` returns a float64 numpy array: higher = more open.

    Class attributes: ``name`` (registry key), ``inputs`` (what ``score`` needs: ``logits``
    and/or ``features``) and ``fit_inputs`` (what ``fit`` needs; empty when nothing is learned,
    and ``fit`` is then a no-op).
    """

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    fit_inputs: tuple[str, ...] = ()

    @property
    def is_fitted(self) -> bool:
        return not self.fit_inputs or getattr(self, "_fitted", False)

    def fit(
        self,
        *,
        logits: ArrayLike | None = None,
        features: ArrayLike | None = None,
        labels: ArrayLike | None = None,
    ) -> Detector:
        """Learn from training (or validation) data of known classes; returns ``self``."""
        if self.fit_inputs:
            given = {"logits": logits, "features": features, "labels": labels}
            self._fit(**_required(self.name, "fit", self.fit_inputs, given))
            self._fitted = True
        return self

    def score(
        self, *, logits: ArrayLike | None = None, features: ArrayLike | None = None
    ) -> np.ndarray:
        """Open score per sample, (N,) float64: higher = more likely open."""
        if not self.is_fitted:
            raise NotFittedError(f"detector {self.name!r} learns from training data: call "
                                 f"fit({', '.join(f'{x}=...' for x in self.fit_inputs)}) first")
        given = {"logits": logits, "features": features}
        result = self._score(**_required(self.name, "score", self.inputs, given))
        if isinstance(result, torch.Tensor):
            result = result.detach().cpu().numpy()
        return np.asarray(result, dtype=np.float64)

    def _fit(self, **inputs: Any) -> None:
        """Learn from ``fit_inputs``; only called for detectors that declare some."""
        raise NotImplementedError

    @abstractmethod
    def _score(self, **inputs: Any) -> torch.Tensor | np.ndarray:
        """The score formula on the declared ``inputs``."""


def _required(
    detector: str, method: str, names: tuple[str, ...], given: dict[str, Any]
) -> dict[str, Any]:
    missing = [name for name in names if given[name] is None]
    if missing:
        raise InputError(f"detector {detector!r}: {method} needs {' and '.join(missing)}")
    return {name: given[name] for name in names}
