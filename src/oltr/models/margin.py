"""Margin-based softmax for face recognition: CosFace and ArcFace.

Both act on the cosines ``cos θ_k = ⟨v/‖v‖, w_k/‖w_k‖⟩`` of a cosine head with a fixed scale s
(OLTR's :class:`~oltr.models.classifiers.CosineClassifier` with ``squash_form="unit"``, no
squashing) and take a margin off the *true* class' cosine only, in training:

* CosFace (Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
  CVPR 2018, Eq. 4):  ``z_y = s · (cos θ_y − m)``,  s = 64, m = 0.35;
* ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019, Eq. 3):  ``z_y = s · cos(θ_y + m)``,  s = 64, m = 0.5;
* every other class keeps ``z_k = s · cos θ_k``, and the loss is the cross-entropy of z.

Interface: the head (:class:`MarginClassifier`) always returns the plain scaled cosines
``s · cos θ`` — the logits used at inference, in evaluation and by the open-set detectors; the
loss (:class:`MarginSoftmaxLoss`, called ``loss(logits, labels)`` like the losses of
:mod:`oltr.losses`) recovers ``cos θ = logits / s``, applies the margin and takes the
cross-entropy. So the network needs no labels in its forward pass; the head's
:meth:`MarginClassifier.margin_loss` builds the loss with the head's own s and m, so they cannot
disagree. CosFace is LDAM with one margin for every class (:class:`oltr.losses.LDAMLoss` with
equal class counts, ``max_margin = s·m``, ``scale = 1`` gives the same loss; tested).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oltr.errors import InputError
from oltr.losses import _check_logits
from oltr.models.classifiers import CosineClassifier

MARGIN_KINDS = ("cosface", "arcface")
DEFAULT_SCALE = 64.0
DEFAULT_MARGINS = {"cosface": 0.35, "arcface": 0.5}
# |logits| / s may exceed 1 by float rounding only; more means the logits are not s·cos θ.
_COSINE_SLACK = 1e-3
# Floor of 1 − cos² under the square root of ArcFace: keeps the gradient finite at cos = ±1.
_SINE_FLOOR = 1e-12


def _check_kind(kind: str) -> None:
    if kind not in MARGIN_KINDS:
        raise InputError(f"unknown margin kind (valid: {', '.join(MARGIN_KINDS)})", value=kind)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _check_margin(kind: str, margin: float) -> float:
    # ArcFace's margin is an angle: beyond π/2 the threshold cos(π − m) turns positive and the
    # fallback no longer applies where θ + m passes π. CosFace's cosines differ by at most 2.
    high = math.pi / 2 if kind == "arcface" else 2.0
    if not 0 <= _as_float(margin) <= high:
        raise InputError(f"{kind} margin must be a number in [0, {high:g}]", value=margin)
    return float(margin)


def _check_scale(scale: float) -> float:
    value = _as_float(scale)
    if not (math.isfinite(value) and value > 0):
        raise InputError("margin softmax scale must be a finite number > 0", value=scale)
    return value


def cosface_target(cosine: torch.Tensor, margin: float = 0.35) -> torch.Tensor:
    """CosFace's target cosine ``cos θ − m`` (Wang et al. 2018, Eq. 4), elementwise."""
    return cosine - margin


def arcface_target(
    cosine: torch.Tensor, margin: float = 0.5, *, easy_margin: bool = False
) -> torch.Tensor:
    """ArcFace's target cosine ``cos(θ + m)`` (Deng et al. 2019, Eq. 3), elementwise, with
    the reference implementation's handling of θ + m > π (insightface, ``easy_margin`` and
    ``threshold`` in the training symbol; the same in the common PyTorch ``ArcMarginProduct``):

    ``cos(θ + m) = cos θ · cos m − sin θ · sin m``,  ``sin θ = √(1 − cos²θ)`` (θ ∈ [0, π]);
    where ``cos θ > cos(π − m)`` (θ + m < π, where cos(θ + m) still falls as θ grows) that
    value, else ``cos θ − m · sin m`` (insightface's ``mm = sin(π − m) · m``; it keeps the
    target logit decreasing in θ). With ``easy_margin``: ``cos(θ + m)`` where ``cos θ > 0``,
    else ``cos θ`` unchanged (no margin past 90°).

    ``cosine`` is clamped to [−1, 1]; ``1 − cos²θ`` is floored at 1e-12 so that the
    gradient stays finite at cos θ = ±1 (it is 0 there for the sine term).
    """
    cosine = cosine.clamp(-1.0, 1.0)
    sine = (1.0 - cosine * cosine).clamp_min(_SINE_FLOOR).sqrt()
    shifted = cosine * math.cos(margin) - sine * math.sin(margin)
    if easy_margin:
        return torch.where(cosine > 0, shifted, cosine)
    threshold = math.cos(math.pi - margin)
    return torch.where(cosine > threshold, shifted, cosine - margin * math.sin(margin))


def apply_margin(
    cosine: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    margin: float,
    *,
    easy_margin: bool = False,
) -> torch.Tensor:
    """Cosines (B, K) with the true class' entry ``cosine[b, labels[b]]`` replaced by its
    CosFace or ArcFace target (:func:`cosface_target`, :func:`arcface_target`); every other
    entry unchanged. A new tensor; differentiable."""
    _check_kind(kind)
    _check_logits(cosine, labels, None)
    labels = labels.long().unsqueeze(1)
    true = cosine.gather(1, labels)
    if kind == "cosface":
        target = cosface_target(true, margin)
    else:
        target = arcface_target(true, margin, easy_margin=easy_margin)
    return cosine.scatter(1, labels, target)


class MarginSoftmaxLoss(nn.Module):
    """CosFace / ArcFace loss on the scaled cosine logits of a unit cosine head:

    ``L = CE(s · margin_y(logits / s), y)`` averaged over the batch, with ``logits = s·cos θ``
    (B, K) and ``margin_y`` the CosFace (``cos θ_y − m``) or ArcFace (``cos(θ_y + m)``)
    target on the true class only (:func:`apply_margin`). Defaults: s = 64, m = 0.35 (CosFace)
    or 0.5 (ArcFace), ``easy_margin`` False (ArcFace only). ``weight`` is the per-class CE
    weight (K,), a buffer that can be reassigned later (``loss.weight = tensor``), as the
    deferred re-weighting schedule does with :class:`oltr.losses.LDAMLoss`; other
    ``ce_kwargs`` go to :func:`torch.nn.functional.cross_entropy` (e.g. ``label_smoothing``).

    Raises :class:`InputError` for a bad kind, scale or margin, for logits not (B, K) with
    labels (B,), and for logits with ``|logits| > s·(1 + 1e-3)`` (not cosines scaled by this
    s: the head and the loss disagree on the scale).
    """

    def __init__(
        self,
        kind: str = "arcface",
        *,
        scale: float = DEFAULT_SCALE,
        margin: float | None = None,
        easy_margin: bool = False,
        weight: torch.Tensor | None = None,
        **ce_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_kind(kind)
        self.kind = kind
        self.scale = _check_scale(scale)
        self.margin = _check_margin(kind, DEFAULT_MARGINS[kind] if margin is None else margin)
        if easy_margin and kind != "arcface":
            raise InputError("easy_margin applies to the arcface margin only", value=kind)
        self.easy_margin = bool(easy_margin)
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.ndim != 1:
                raise InputError("the class weights must be 1-D (K,)", value=tuple(weight.shape))
        self.register_buffer("weight", weight)
        self.ce_kwargs = ce_kwargs

    def margin_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training logits ``s · margin_y(logits / s)`` (B, K), float32."""
        _check_logits(logits, labels, None)
        cosine = logits.float() / self.scale
        if cosine.numel() and float(cosine.detach().abs().max()) > 1.0 + _COSINE_SLACK:
            raise InputError(
                f"{self.kind} loss needs logits s·cos θ from a unit cosine head with scale "
                f"s = {self.scale:g}; got |logits| up to {float(logits.detach().abs().max()):g}")
        cosine = cosine.clamp(-1.0, 1.0)
        adjusted = apply_margin(cosine, labels, self.kind, self.margin,
                                easy_margin=self.easy_margin)
        return self.scale * adjusted

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.shape != (logits.shape[-1],):
            raise InputError(f"the class weights have {self.weight.numel()} entries but the "
                             f"logits have {logits.shape[-1]} classes")
        return F.cross_entropy(self.margin_logits(logits, labels), labels.long(),
                               weight=self.weight, **self.ce_kwargs)

    def extra_repr(self) -> str:
        easy = ", easy_margin=True" if self.easy_margin else ""
        return f"kind={self.kind!r}, scale={self.scale:g}, margin={self.margin:g}{easy}"


class CosFaceLoss(MarginSoftmaxLoss):
    """:class:`MarginSoftmaxLoss` with CosFace's margin: ``CE(s·(cos θ_y − m), …)``,
    s = 64, m = 0.35 (Wang et al., CVPR 2018)."""

    def __init__(self, *, scale: float = DEFAULT_SCALE, margin: float = 0.35,
                 **ce_kwargs: Any) -> None:
        super().__init__("cosface", scale=scale, margin=margin, **ce_kwargs)


class ArcFaceLoss(MarginSoftmaxLoss):
    """:class:`MarginSoftmaxLoss` with ArcFace's margin: ``CE(s·cos(θ_y + m), …)``,
    s = 64, m = 0.5, reference threshold handling (Deng et al., CVPR 2019)."""

    def __init__(self, *, scale: float = DEFAULT_SCALE, margin: float = 0.5,
                 easy_margin: bool = False, **ce_kwargs: Any) -> None:
        super().__init__("arcface", scale=scale, margin=margin, easy_margin=easy_margin,
                         **ce_kwargs)


class MarginClassifier(CosineClassifier):
    """Face head for CosFace / ArcFace: ``logits_k = s · cos θ_k`` (no bias), i.e. OLTR's
    :class:`CosineClassifier` with ``squash_form="unit"`` and a fixed scale s (default 64).

    ``forward(v)`` (B, d) → (B, K) plain scaled cosines, in training as at inference; the
    margin lives in the loss built by :meth:`margin_loss` from the head's own ``kind``,
    ``scale``, ``margin`` (default 0.35 for ``cosface``, 0.5 for ``arcface``) and
    ``easy_margin``. State-dict keys are the cosine classifier's (``weight``, ``scale``).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        kind: str = "arcface",
        scale: float = DEFAULT_SCALE,
        margin: float | None = None,
        easy_margin: bool = False,
    ) -> None:
        # Validate everything once, through the loss this head pairs with.
        loss = MarginSoftmaxLoss(kind, scale=scale, margin=margin, easy_margin=easy_margin)
        super().__init__(in_dim, num_classes, scale=loss.scale, squash_form="unit")
        self.kind, self.margin, self.easy_margin = loss.kind, loss.margin, loss.easy_margin

    def margin_loss(self, **ce_kwargs: Any) -> MarginSoftmaxLoss:
        """The training loss ``loss(logits, labels)`` matching this head (same s, m)."""
        return MarginSoftmaxLoss(self.kind, scale=float(self.scale), margin=self.margin,
                                 easy_margin=self.easy_margin, **ce_kwargs)

    def extra_repr(self) -> str:
        easy = ", easy_margin=True" if self.easy_margin else ""
        return (f"in_dim={self.in_dim}, num_classes={self.num_classes}, kind={self.kind!r}, "
                f"scale={self.scale.item():g}, margin={self.margin:g}{easy}")
