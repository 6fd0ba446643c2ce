"""The one interface of every open-set detector: ``fit`` where something is learned, then
``score``; **higher = more likely open** (docs/method.md, the direction of :mod:`oltr.openset`).

Detectors work on stored logits ``(N, K)`` and/or features ``(N, d)`` (torch tensors or numpy
arrays), so many detectors cost one forward pass. Detectors that change the features and
re-run the classifier (ReAct, ASH, SCALE, ViM) also take the network's ``head``, a callable
features ``(N, d)`` → logits ``(N, K)`` (:mod:`oltr.detectors.head`). Inputs a detector does
not declare are ignored, so a caller may pass everything it has to every detector — the two
doors of pytorch-ood's ``api.py`` (stored features, or the model) become one call.

A fitted detector is saved as tensors (:meth:`Detector.state_dict`, for a safetensors file)
plus its JSON-able constructor options (:meth:`Detector.config`);
:func:`oltr.detectors.restore_detector` rebuilds it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from oltr.detectors.head import Head
from oltr.errors import InputError, OltrError

ArrayLike = torch.Tensor | np.ndarray

_HINTS = {"head": " (a callable features (N, d) → logits (N, K), e.g. "
                  "oltr.detectors.network_head(net))"}


class NotFittedError(OltrError, RuntimeError):
    """A detector that learns from training data was asked to score (or save) before ``fit``."""


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

    Class attributes: ``name`` (registry key), ``inputs`` (what ``score`` needs: ``logits``,
    ``features`` and/or ``head``), ``fit_inputs`` (what ``fit`` needs, also ``labels``; empty
    when nothing is learned, and ``fit`` is then a no-op), ``options`` (the constructor
    arguments :meth:`config` returns) and ``state_names`` (the tensors :meth:`state_dict`
    holds once fitted).
    """

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    fit_inputs: tuple[str, ...] = ()
    options: ClassVar[tuple[str, ...]] = ()
    state_names: ClassVar[tuple[str, ...]] = ()

    @property
    def is_fitted(self) -> bool:
        return not self.fit_inputs or getattr(self, "_fitted", False)

    def fit(
        self,
        *,
        logits: ArrayLike | None = None,
        features: ArrayLike | None = None,
        labels: ArrayLike | None = None,
        head: Head | None = None,
    ) -> Detector:
        """Learn from training (or validation) data of known classes; returns ``self``.

        Raises:
            InputError: an input in ``fit_inputs`` is missing or malformed.
        """
        if self.fit_inputs:
            given = {"logits": logits, "features": features, "labels": labels, "head": head}
            self._fit(**_required(self.name, "fit", self.fit_inputs, given))
            self._fitted = True
        return self

    def score(
        self,
        *,
        logits: ArrayLike | None = None,
        features: ArrayLike | None = None,
        head: Head | None = None,
    ) -> np.ndarray:
        """Open score per sample, (N,) float64: higher = more likely open.

        Raises:
            NotFittedError: the detector learns from training data and was not fitted.
            InputError: an input in ``inputs`` is missing or malformed.
        """
        self._check_fitted("score")
        given = {"logits": logits, "features": features, "head": head}
        result = self._score(**_required(self.name, "score", self.inputs, given))
        if isinstance(result, torch.Tensor):
            result = result.detach().cpu().numpy()
        return np.asarray(result, dtype=np.float64)

    def export_refusal(self) -> str | None:
        """Why :meth:`traceable_score` cannot express this detector (e.g. a step that needs
        gradients), or None when it can. ONNX export (:mod:`oltr.export`) refuses a detector
        with a reason."""
        return None

    def traceable_score(
        self,
        *,
        logits: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        head: Head | None = None,
    ) -> torch.Tensor:
        """The open score (N,) as torch operations only — the formula :meth:`score` applies
        once it has checked its inputs — for tracing (``torch.onnx.export``, :mod:`oltr.export`):
        no checks of values (the inputs must be finite, 2-D floating tensors of the fitted
        dimension), no numpy, no Python branch on the data, one block for all rows, ``head``
        called directly. The dtype is the formula's (float64 where :meth:`score` computes in
        float64; the logits' dtype for the softmax and energy scores).

        Raises:
            NotFittedError: the detector learns from training data and was not fitted.
            InputError: a declared input is missing, or the detector cannot be traced
                (:meth:`export_refusal`).
        """
        self._check_fitted("export")
        reason = self.export_refusal()
        if reason is not None:
            raise InputError(f"open score {self.name!r} cannot be exported: {reason}")
        given = {"logits": logits, "features": features, "head": head}
        return self._formula(**_required(self.name, "score", self.inputs, given))

    def config(self) -> dict[str, Any]:
        """The constructor options, JSON-able: ``type(self)(**config())`` is this detector
        before ``fit`` (tensors a constructor takes, e.g. given centroids, are state)."""
        return {option: getattr(self, option) for option in self.options}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What ``fit`` learned, as CPU tensors (scalars 0-d) named ``state_names``; ``{}`` for
        a detector with nothing to learn. Ready for ``safetensors.torch.save_file``.

        Raises:
            NotFittedError: the detector learns from training data and was not fitted.
        """
        self._check_fitted("save")
        state = self._state() if self.state_names else {}
        return {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> Detector:
        """Restore what :meth:`state_dict` returned (into a detector built with the same
        :meth:`config`); the detector is then fitted. Returns ``self``.

        Raises:
            InputError: a missing or unexpected key, a non-tensor, or shapes that disagree.
        """
        missing = [key for key in self.state_names if key not in state]
        unexpected = [key for key in state if key not in self.state_names]
        if missing or unexpected:
            raise InputError(f"detector {self.name!r}: the state must hold exactly "
                             f"{list(self.state_names)}; missing {missing}, unexpected "
                             f"{unexpected}")
        for key in self.state_names:
            if not isinstance(state[key], torch.Tensor):
                raise InputError(f"detector {self.name!r}: state {key!r} must be a tensor",
                                 value=type(state[key]).__name__)
        if self.state_names:
            self._load_state({key: state[key].detach().clone() for key in self.state_names})
            self._fitted = True
        return self

    def _check_fitted(self, action: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"detector {self.name!r} learns from training data: call "
                                 f"fit({', '.join(f'{x}=...' for x in self.fit_inputs)}) "
                                 f"before you {action}")

    def _fit(self, **inputs: Any) -> None:
        """Learn from ``fit_inputs``; only called for detectors that declare some."""
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors named ``state_names``."""
        raise NotImplementedError

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Check and set the tensors named ``state_names`` (keys already checked)."""
        raise NotImplementedError

    @abstractmethod
    def _score(self, **inputs: Any) -> torch.Tensor | np.ndarray:
        """The score on the declared ``inputs``: checks them, then applies the formula
        (:meth:`_formula`, in blocks of rows where the memory needs it)."""

    def _formula(self, **inputs: Any) -> torch.Tensor:
        """The score formula on checked ``inputs``, torch operations only (see
        :meth:`traceable_score`); detectors that :meth:`export_refusal` need not have one."""
        raise NotImplementedError(f"detector {self.name!r} has no traceable formula")


def check_state_shape(detector: str, key: str, tensor: torch.Tensor,
                      shape: tuple[int | None, ...]) -> None:
    """Raise an ``InputError`` unless ``tensor`` is floating with ``shape`` (None: any size)."""
    if (not tensor.is_floating_point() or tensor.ndim != len(shape)
            or any(want is not None and got != want for got, want in zip(tensor.shape, shape))):
        expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise InputError(f"detector {detector!r}: state {key!r} must be a floating tensor of "
                         f"shape {expected}", value=f"{tuple(tensor.shape)} {tensor.dtype}")


def _required(
    detector: str, method: str, names: tuple[str, ...], given: dict[str, Any]
) -> dict[str, Any]:
    missing = [name for name in names if given[name] is None]
    if missing:
        raise InputError(f"detector {detector!r}: {method} needs {' and '.join(missing)}"
                         + "".join(_HINTS.get(name, "") for name in missing))
    return {name: given[name] for name in names}
