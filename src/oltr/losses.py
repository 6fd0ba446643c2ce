"""Losses: OLTR's centroid losses, and the competing methods' losses (paper §4, issue 4).

Centroid losses (Eq. 7, 9; docs/reproduction.md) are called as ``loss(features, labels, centroids)``:
the centroids belong to the network's memory (``MetaEmbedding.centroids``), not to the loss,
so the memory and the loss always see the same tensor. Which features to pass (``v_direct``,
where the centroids live, or ``v_meta`` as Eq. 9 is printed) is the caller's choice.

The competing methods' losses are called as ``loss(logits, labels)`` (classification losses,
see :func:`build_classification_loss`) or ``loss(features, labels)`` (metric losses added to
the cross-entropy, see :func:`build_feature_loss`). All of them average over the batch.

Every loss is registered by name in one of three registries (:class:`oltr.registry.Registry`):
:data:`CLASSIFICATION_LOSSES` (``train.loss``), :data:`FEATURE_LOSSES` (``train.feature_loss``)
and :data:`CENTROID_LOSSES` (``train.centroid_loss``), each entry a :class:`LossBuilder` that
also names the ``train`` config keys of its options; the config's allowed values are these
names. A loss of one's own is added with :func:`register_loss`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oltr.errors import InputError
from oltr.registry import Registry

CENTROID_UPDATES = ("original", "autograd")


def _check_inputs(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> None:
    if (
        features.ndim != 2
        or centroids.ndim != 2
        or features.shape[1] != centroids.shape[1]
        or labels.shape != (features.shape[0],)
    ):
        raise InputError(
            "centroid losses need features (B, d), labels (B,) and centroids (K, d)",
            value=(tuple(features.shape), tuple(labels.shape), tuple(centroids.shape)),
        )


def _margins(features: torch.Tensor, margin: float, relative: bool) -> torch.Tensor | float:
    """The hinge margin: ``m``, or ``m · ‖v_b‖`` per sample (detached) when ``relative``."""
    if not relative:
        return margin
    return margin * features.detach().float().norm(dim=1)


class _CentroidHinge(nn.Module):
    """``mean_b max(0, ‖v_b − c_{y_b}‖ − repel_b + m_b)`` with Euclidean distances from
    ``torch.cdist``; subclasses say what ``repel_b`` is (:meth:`_repel`). ``m_b = m``, or
    ``m · ‖v_b‖`` (detached) with ``relative=True``."""

    def __init__(self, margin: float = 5.0, *, relative: bool = False) -> None:
        super().__init__()
        if margin < 0:
            raise InputError("margin must be >= 0", value=margin)
        self.margin = float(margin)
        self.relative = bool(relative)

    def _repel(self, distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hinge(
        self, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
    ) -> torch.Tensor:
        """The per-sample hinge argument (B,): the sample is *active* where it is > 0."""
        _check_inputs(features, labels, centroids)
        labels = labels.long().unsqueeze(1)
        distances = torch.cdist(features.float(), centroids.float())  # (B, K)
        own = distances.gather(1, labels).squeeze(1)
        return own - self._repel(distances, labels) + _margins(features, self.margin,
                                                                 self.relative)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
    ) -> torch.Tensor:
        return self.hinge(features, labels, centroids).clamp_min(0).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}, relative={self.relative}"


class LargeMarginCentroidLoss(_CentroidHinge):
    """Large-margin loss of Eq. 9 **as printed** (form ``printed``), averaged over the batch:

    ``L = mean_b max(0, ‖v_b − c_{y_b}‖ − Σ_{i≠y_b} ‖v_b − c_i‖ + m)``  (paper: m = 5, λ = 0.1).

    The repelling sum runs over all K − 1 other centroids, so it grows with K and the hinge
    practically never opens: measured at the start of stage 2 on Fashion-MNIST-LT (development
    curation, the stage-1 model's direct features, centroids = class means) it is active for
    0.0 % of the train images (docs/method.md); the loss and its gradient are then exactly zero
    and Eq. 7 is plain cross-entropy. Kept to reproduce the printed equation;
    :class:`NearestCentroidLoss` is the form that acts. ``relative=True`` scales the margin by
    each feature's norm.
    """

    def _repel(self, distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return distances.sum(dim=1) - distances.gather(1, labels).squeeze(1)


class NearestCentroidLoss(_CentroidHinge):
    """Large-margin centroid loss against the **nearest other** centroid (form ``nearest``, a
    triplet on the memory: anchor v, positive c_y, negative the closest c_i, i ≠ y), averaged
    over the batch:

    ``L = mean_b max(0, ‖v_b − c_{y_b}‖ − min_{i≠y_b} ‖v_b − c_i‖ + m_b)``

    with ``m_b = m`` (``relative=False``) or ``m · ‖v_b‖`` (``relative=True``, scale-free: the
    margin is a fraction of the feature's norm). Eq. 9 read so that it can act: it pulls v to
    its own centroid and pushes the nearest competitor away until it is ``m`` farther. It is
    what the paper's text describes (“enlarge the inter-class distance”); the printed sum over
    all K − 1 centroids (:class:`LargeMarginCentroidLoss`) never opens. Fraction of samples
    active, measured on real features, in docs/method.md. K = 1 has no other centroid: the loss
    is then ``max(0, ‖v − c_y‖ + m)`` (attraction only).
    """

    def _repel(self, distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if distances.shape[1] == 1:
            return torch.zeros_like(distances[:, 0])
        return distances.scatter(1, labels, float("inf")).min(dim=1).values


class _OriginalAttract(torch.autograd.Function):
    """Centre-loss attraction with the original code's centroid gradient.

    Forward: ``Σ_b ‖f_b − c_{y_b}‖² / (2B)``. Backward: features get ``g·(f_b − c_{y_b})/B``
    (g = upstream gradient); centroid k gets ``Σ_{b: y_b = k} (c_k − f_b) / ((1 + n_k)·B)``,
    the centre-loss update of Wen et al. (2016), *not* multiplied by g.
    """

    @staticmethod
    def forward(
        ctx: Any, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
    ) -> torch.Tensor:
        diff = features.float() - centroids.float().index_select(0, labels)
        ctx.save_for_backward(diff, labels)
        ctx.num_classes = centroids.shape[0]
        ctx.dtypes = (features.dtype, centroids.dtype)
        return diff.pow(2).sum() / (2 * features.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        diff, labels = ctx.saved_tensors
        batch = diff.shape[0]
        grad_features = grad_output * diff / batch
        counts = 1 + torch.bincount(labels, minlength=ctx.num_classes).to(diff.dtype)
        grad_centroids = torch.zeros(ctx.num_classes, diff.shape[1], dtype=diff.dtype,
                                     device=diff.device).index_add_(0, labels, -diff)
        grad_centroids = grad_centroids / (counts.unsqueeze(1) * batch)
        return grad_features.to(ctx.dtypes[0]), None, grad_centroids.to(ctx.dtypes[1])


class OriginalCentroidLoss(nn.Module):
    """The original code's "discriminative centroids" loss, as we read it (DiscCentroidsLoss):

    ``attract = Σ_b ‖f_b − c_{y_b}‖² / (2B)``  (centre loss)
    ``repel   = max(0, m − Σ_b Σ_{i≠y_b} ‖f_b − c_i‖² / (B·K))``  (squared distances; the
    divisor is B·K, not B·(K−1): the own-class entries count as zeros, as in the code)
    ``L = attract + repel_weight · repel``  (original: m = 10, repel_weight = 0.01, and the
    whole loss weighted by 0.01 on ``v_direct``).

    With ``centroid_update="original"`` (default) the centroids' gradient of the attract term
    is the original's hand-written one: ``Σ_{b: y_b=k} (c_k − f_b) / ((1 + n_k)·B)``, which
    ignores the loss weight (and any gradient scaling) applied outside; with ``"autograd"``
    it is the plain gradient ``Σ_{b: y_b=k} (c_k − f_b) / B`` times the loss weight. The
    features' gradient and the repel term's gradients are the plain ones in both cases.
    """

    def __init__(
        self, margin: float = 10.0, *, repel_weight: float = 0.01, centroid_update: str = "original"
    ) -> None:
        super().__init__()
        if margin < 0 or repel_weight < 0:
            raise InputError("margin and repel_weight must be >= 0", value=(margin, repel_weight))
        if centroid_update not in CENTROID_UPDATES:
            raise InputError(
                f"unknown centroid_update (valid: {', '.join(CENTROID_UPDATES)})",
                value=centroid_update,
            )
        self.margin = float(margin)
        self.repel_weight = float(repel_weight)
        self.centroid_update = centroid_update

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
    ) -> torch.Tensor:
        _check_inputs(features, labels, centroids)
        labels = labels.long()
        batch, num_classes = features.shape[0], centroids.shape[0]
        f, c = features.float(), centroids.float()
        if self.centroid_update == "original":
            attract = _OriginalAttract.apply(features, labels, centroids)
        else:
            attract = (f - c.index_select(0, labels)).pow(2).sum() / (2 * batch)
        squared = (
            f.pow(2).sum(dim=1, keepdim=True) + c.pow(2).sum(dim=1) - 2.0 * f @ c.t()
        ).clamp_min(0)
        own = squared.gather(1, labels.unsqueeze(1))
        repel_distance = (squared.sum() - own.sum()) / (batch * num_classes)
        repel = (self.margin - repel_distance).clamp_min(0)
        return attract + self.repel_weight * repel

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin:g}, repel_weight={self.repel_weight:g}, "
            f"centroid_update={self.centroid_update!r}"
        )


def _original_centroid_loss(*, relative: bool = False, **kwargs: Any) -> OriginalCentroidLoss:
    """:class:`OriginalCentroidLoss`, refusing a relative margin (it has none)."""
    if relative:
        raise InputError("the original centroid loss has no relative margin "
                         "(train.centroid_relative_margin: false)", value="original")
    return OriginalCentroidLoss(**kwargs)


def build_centroid_loss(form: str = "nearest", **kwargs: Any) -> nn.Module:
    """The centroid loss registered as ``form`` in :data:`CENTROID_LOSSES`: ``nearest`` →
    :class:`NearestCentroidLoss`, ``printed`` → :class:`LargeMarginCentroidLoss` (Eq. 9 as
    printed, inert), ``original`` → :class:`OriginalCentroidLoss`. ``kwargs`` go to its
    constructor (None ones left out: the constructor's default applies).

    Raises:
        InputError: an unknown form (the message lists the registered ones), or the
            constructor's own errors (``original`` with ``relative=True``).
    """
    if form not in CENTROID_LOSSES:
        hint = (" ('paper' is now 'printed': Eq. 9 as printed, which never acts)"
                if form == "paper" else "")
        raise InputError(
            f"unknown centroid loss form (valid: {', '.join(CENTROID_LOSSES)}){hint}", value=form
        )
    return CENTROID_LOSSES.create(form, **kwargs)


# --------------------------------------------------------------- competing methods' losses


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> None:
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise InputError("classification losses need logits (B, K) and labels (B,)",
                         value=(tuple(logits.shape), tuple(labels.shape)))
    if num_classes is not None and logits.shape[1] != num_classes:
        raise InputError(f"logits have {logits.shape[1]} classes but the loss was built for "
                         f"{num_classes}", value=tuple(logits.shape))


def _check_features(features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise InputError("metric losses need features (B, d) and labels (B,)",
                         value=(tuple(features.shape), tuple(labels.shape)))


def _class_counts(class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-class train counts as a float64 tensor (K,); every count an integer >= 1."""
    counts = torch.as_tensor(class_counts).detach().cpu().to(torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise InputError("class_counts must be a non-empty 1-D sequence",
                         value=tuple(counts.shape))
    bad = (~torch.isfinite(counts)) | (counts < 1) | (counts != counts.round())
    if bool(bad.any()):
        index = int(torch.nonzero(bad)[0])
        raise InputError(f"class_counts must be integers >= 1; class {index} is not",
                         value=float(counts[index]))
    return counts


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. 5):

    ``FL = mean_b −α_{y_b} (1 − p_{b,y_b})^γ log p_{b,y_b}``,  p = softmax(logits).

    γ = 0 and no α is the cross-entropy. ``alpha`` is None (α = 1), one number for every
    class, or one weight per class (the multi-class form of the paper's α-balancing).
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None) -> None:
        super().__init__()
        if not (np.isfinite(gamma) and gamma >= 0):
            raise InputError("focal loss gamma must be a finite number >= 0", value=gamma)
        self.gamma = float(gamma)
        alpha_tensor = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_tensor is not None and (alpha_tensor.ndim > 1 or bool((alpha_tensor < 0).any())):
            raise InputError("focal loss alpha must be a number or 1-D weights, all >= 0",
                             value=alpha)
        self.register_buffer("alpha", alpha_tensor)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        num_classes = self.alpha.numel() if self.alpha is not None and self.alpha.ndim else None
        _check_logits(logits, labels, num_classes)
        labels = labels.long().unsqueeze(1)
        log_true = torch.log_softmax(logits.float(), dim=1).gather(1, labels).squeeze(1)
        loss = -(-torch.expm1(log_true)).pow(self.gamma) * log_true  # (1 − p)^γ · (−log p)
        if self.alpha is not None:
            loss = loss * (self.alpha[labels.squeeze(1)] if self.alpha.ndim else self.alpha)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}"


class RangeLoss(nn.Module):
    """Range loss (Zhang et al., "Range Loss for Deep Face Recognition with Long-Tailed
    Training Data", ICCV 2017, Eq. 2–4), on features; added to the cross-entropy by the caller:

    ``L_intra = Σ_{classes c in the batch} k / Σ_{j=1}^{k} 1/D_{c,j}``  (harmonic mean of
    the k largest squared distances between two samples of class c),
    ``L_inter = max(0, m − D_center)``  (D_center: smallest squared distance between two
    class centres of the batch),
    ``L = intra_weight · L_intra + inter_weight · L_inter``  (the paper's α, β).

    Distances are squared Euclidean, as printed. A class with fewer than k sample pairs in
    the batch uses all its pairs; a class with one sample adds nothing, and a batch with one
    class has no inter-class term.
    """

    def __init__(
        self, margin: float, k: int = 2, *, intra_weight: float = 1.0, inter_weight: float = 1.0
    ) -> None:
        super().__init__()
        if not (np.isfinite(margin) and margin >= 0):
            raise InputError("range loss margin must be a finite number >= 0", value=margin)
        if int(k) != k or k < 1:
            raise InputError("range loss k must be an integer >= 1", value=k)
        if intra_weight < 0 or inter_weight < 0:
            raise InputError("range loss weights must be >= 0", value=(intra_weight, inter_weight))
        self.margin, self.k = float(margin), int(k)
        self.intra_weight, self.inter_weight = float(intra_weight), float(inter_weight)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_features(features, labels)
        features, labels = features.float(), labels.long()
        classes = labels.unique()
        intra = features.new_zeros(())
        for label in classes:
            members = features[labels == label]
            if members.shape[0] < 2:
                continue
            rows, columns = torch.triu_indices(members.shape[0], members.shape[0], offset=1)
            pair_distances = (members[rows] - members[columns]).pow(2).sum(dim=1)
            largest = pair_distances.topk(min(self.k, pair_distances.numel())).values
            intra = intra + largest.numel() / largest.clamp_min(1e-12).reciprocal().sum()
        inter = features.new_zeros(())
        if classes.numel() > 1:
            one_hot = (labels.unsqueeze(0) == classes.unsqueeze(1)).float()  # (C, B)
            centres = one_hot @ features / one_hot.sum(dim=1, keepdim=True)
            rows, columns = torch.triu_indices(centres.shape[0], centres.shape[0], offset=1)
            nearest = (centres[rows] - centres[columns]).pow(2).sum(dim=1).min()
            inter = (self.margin - nearest).clamp_min(0)
        return self.intra_weight * intra + self.inter_weight * inter

    def extra_repr(self) -> str:
        return (f"margin={self.margin:g}, k={self.k}, intra_weight={self.intra_weight:g}, "
                f"inter_weight={self.inter_weight:g}")


class LiftedStructureLoss(nn.Module):
    """Lifted structured embedding loss, smooth form (Oh Song et al., "Deep Metric Learning
    via Lifted Structured Feature Embedding", CVPR 2016, Eq. 4), on features:

    ``J_ij = log(Σ_{(i,k)∈N} exp(m − D_ik) + Σ_{(j,l)∈N} exp(m − D_jl)) + D_ij``,
    ``L = 1/(2|P|) Σ_{(i,j)∈P} max(0, J_ij)²``,

    with D Euclidean (not squared), P the unordered same-class pairs of the batch and N the
    different-class pairs. A batch without a positive or a negative pair gives 0.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if not np.isfinite(margin):
            raise InputError("lifted structure margin must be finite", value=margin)
        self.margin = float(margin)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_features(features, labels)
        features, labels = features.float(), labels.long()
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        rows, columns = torch.triu_indices(len(labels), len(labels), offset=1)
        positive = same[rows, columns]
        if not bool(positive.any()) or bool(same.all()):
            return features.sum() * 0.0
        squared = features.pow(2).sum(dim=1)
        distances = (squared.unsqueeze(0) + squared.unsqueeze(1) - 2.0 * features @ features.t())
        distances = distances.clamp_min(1e-12).sqrt()
        negative_terms = (self.margin - distances).masked_fill(same, float("-inf"))
        negative_lse = torch.logsumexp(negative_terms, dim=1)  # finite: every row has a negative
        rows, columns = rows[positive], columns[positive]
        objective = torch.logaddexp(negative_lse[rows], negative_lse[columns])
        objective = objective + distances[rows, columns]
        return objective.clamp_min(0).pow(2).sum() / (2 * rows.numel())

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}"


class BalancedSoftmaxLoss(nn.Module):
    """Balanced softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition", NeurIPS 2020, Eq. 4): ``L = CE(z + log n, y)``, n the train count per class.

    Only the loss sees the shift: predict with the plain logits z.
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("log_counts", _class_counts(class_counts).log().float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, labels, self.log_counts.numel())
        return F.cross_entropy(logits.float() + self.log_counts, labels.long())


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR
    2021, Eq. 10): ``L = CE(z + τ log π, y)``, π the train class prior n / Σn.

    τ = 1 gives the same loss as :class:`BalancedSoftmaxLoss` (a softmax ignores the constant
    log Σn). Only the loss sees the shift: predict with the plain logits z.
    """

    def __init__(
        self, class_counts: Sequence[int] | np.ndarray | torch.Tensor, tau: float = 1.0
    ) -> None:
        super().__init__()
        if not np.isfinite(tau):
            raise InputError("logit adjustment tau must be finite", value=tau)
        counts = _class_counts(class_counts)
        self.tau = float(tau)
        self.register_buffer("adjustment", (self.tau * (counts / counts.sum()).log()).float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, labels, self.adjustment.numel())
        return F.cross_entropy(logits.float() + self.adjustment, labels.long())

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}"


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019, Eq. 13):

    ``Δ_c = C / n_c^{1/4}``, C chosen so that max_c Δ_c = ``max_margin``;
    ``L = CE(s · (z − Δ_y e_y), y; weight)``  (the margin is taken off the true class' logit).

    Cao et al. use logits from a normalised linear layer (cosines, |z| ≤ 1) with s = 30; with
    a plain linear classifier use ``scale=1``. ``weight`` is the per-class CE weight that the
    deferred re-weighting schedule (DRW) sets later in training, see :func:`drw_class_weights`;
    assign a new one with ``loss.weight = tensor``.
    """

    def __init__(
        self,
        class_counts: Sequence[int] | np.ndarray | torch.Tensor,
        max_margin: float = 0.5,
        scale: float = 30.0,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not (np.isfinite(max_margin) and max_margin > 0):
            raise InputError("LDAM max_margin must be a finite number > 0", value=max_margin)
        if not (np.isfinite(scale) and scale > 0):
            raise InputError("LDAM scale must be a finite number > 0", value=scale)
        counts = _class_counts(class_counts)
        margins = counts.pow(-0.25)
        self.max_margin, self.scale = float(max_margin), float(scale)
        self.register_buffer("margins", (margins * (self.max_margin / margins.max())).float())
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.shape != (counts.numel(),):
                raise InputError(f"LDAM weight must have one entry per class ({counts.numel()})",
                                 value=tuple(weight.shape))
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_logits(logits, labels, self.margins.numel())
        labels = labels.long()
        true_class = F.one_hot(labels, self.margins.numel()).to(torch.float32)
        shifted = logits.float() - true_class * self.margins[labels].unsqueeze(1)
        return F.cross_entropy(self.scale * shifted, labels, weight=self.weight)

    def extra_repr(self) -> str:
        return f"max_margin={self.max_margin:g}, scale={self.scale:g}"


def drw_class_weights(
    class_counts: Sequence[int] | np.ndarray | torch.Tensor, beta: float = 0.9999
) -> torch.Tensor:
    """Class-balanced weights from the effective number of samples (Cui et al., CVPR 2019,
    Eq. 4), as used by LDAM-DRW (Cao et al., 2019, Alg. 1):

    ``w_c = (1 − β) / (1 − β^{n_c})``, normalised so that Σ_c w_c = K. Float32, (K,).
    """
    if not 0.0 <= beta < 1.0:
        raise InputError("beta must lie in [0, 1)", value=beta)
    counts = _class_counts(class_counts)
    weights = (1.0 - beta) / (1.0 - beta**counts)  # float64: exact enough at β = 0.9999
    return (weights * (counts.numel() / weights.sum())).float()


# --------------------------------------------------------------------------- registries


@dataclass(frozen=True)
class LossBuilder:
    """A registered loss: how to build it, and from which ``train`` config keys.

    Calling it builds the loss: ``builder(class_counts=None, **kwargs)``; ``class_counts``
    (train images per class) goes first to a loss that ``needs_class_counts`` and is ignored
    by the others.

    Attributes:
        name: its registered name (``train.loss`` etc.).
        build: the constructor (a class or a function returning an ``nn.Module``).
        options: constructor argument → key of the config's ``train`` section that gives it
            (``{"gamma": "focal_gamma"}``); :meth:`config_options` reads them.
        needs_class_counts: the constructor takes the class counts as its first argument.
        kind: ``classification``, ``feature`` or ``centroid`` (a key of :data:`LOSSES`).
        takes_class_weights: the built loss weighs classes by its ``weight`` attribute (K,)
            (None: equally), which deferred re-weighting (``train.drw_epoch``) assigns.
    """

    name: str
    build: Callable[..., nn.Module]
    options: Mapping[str, str] = field(default_factory=dict)
    needs_class_counts: bool = False
    kind: str = "classification"
    takes_class_weights: bool = False

    @property
    def takes_label_smoothing(self) -> bool:
        """Whether the loss reads ``train.label_smoothing`` (one of its :attr:`options`)."""
        return "label_smoothing" in self.options.values()

    def __call__(
        self,
        class_counts: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        """The loss, built with ``kwargs`` (and ``class_counts`` where it needs them).

        Raises:
            InputError: the loss needs ``class_counts`` and none were given; and the
                constructor's own errors.
        """
        if not self.needs_class_counts:
            return self.build(**kwargs)
        if class_counts is None:
            raise InputError(f"{self.kind} loss {self.name!r} needs class_counts")
        return self.build(class_counts, **kwargs)

    def config_options(self, train_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor's keyword arguments read from a config's ``train`` section."""
        return {argument: train_cfg[key] for argument, key in self.options.items()}


#: ``train.loss``: losses called as ``loss(logits, labels)``.
CLASSIFICATION_LOSSES: Registry[LossBuilder] = Registry("classification loss")
#: ``train.feature_loss`` (or ``none``): metric losses ``loss(features, labels)``, added to the
#: cross-entropy with a weight.
FEATURE_LOSSES: Registry[LossBuilder] = Registry("feature loss")
#: ``train.centroid_loss`` (or ``none``): losses ``loss(features, labels, centroids)``.
CENTROID_LOSSES: Registry[LossBuilder] = Registry("centroid loss form")
#: The earlier name of :data:`CENTROID_LOSSES` (its names are the centroid loss forms).
CENTROID_LOSS_FORMS = CENTROID_LOSSES
#: Every loss registry by kind.
LOSSES: dict[str, Registry[LossBuilder]] = {
    "classification": CLASSIFICATION_LOSSES,
    "feature": FEATURE_LOSSES,
    "centroid": CENTROID_LOSSES,
}


def register_loss(
    kind: str,
    name: str,
    build: Callable[..., nn.Module] | None = None,
    *,
    options: Mapping[str, str] | None = None,
    needs_class_counts: bool = False,
    takes_class_weights: bool = False,
) -> Any:
    """Register the loss constructor ``build`` as ``name`` in the registry of ``kind``
    (``classification``, ``feature`` or ``centroid``); without ``build``, a decorator that
    does so (and returns the constructor unchanged). ``options`` maps constructor arguments to
    the ``train`` config keys that give them (a loss with the option ``label_smoothing`` is
    one that ``train.label_smoothing`` applies to); ``needs_class_counts``: the constructor
    takes the per-class train counts first; ``takes_class_weights``: the loss has a per-class
    ``weight`` attribute that deferred re-weighting (``train.drw_epoch``) may assign. The
    config then accepts ``name`` (``train.loss``, ``train.feature_loss``,
    ``train.centroid_loss``), training builds it (:func:`loss_from_config`), and
    :func:`build_classification_loss` etc. build it. Its options must be config keys of
    ``configs/base.yaml``.

    Raises:
        InputError: an unknown kind, or a name already registered.
    """
    if kind not in LOSSES:
        raise InputError(f"unknown loss kind (valid: {', '.join(LOSSES)})", value=kind)

    def decorator(target: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        LOSSES[kind].register(name, LossBuilder(name, target, dict(options or {}),
                                                needs_class_counts, kind,
                                                takes_class_weights=takes_class_weights))
        return target

    return decorator if build is None else decorator(build)


def loss_from_config(
    kind: str,
    name: str,
    train_cfg: Mapping[str, Any],
    *,
    class_counts: Sequence[int] | np.ndarray | torch.Tensor | None = None,
) -> nn.Module:
    """The loss ``name`` of ``kind`` built with its options read from the config's ``train``
    section (:attr:`LossBuilder.options`) and, where it needs them, ``class_counts``.

    Raises:
        InputError: an unknown kind or name (listing the valid ones), missing class counts,
            or the constructor's own errors.
    """
    if kind not in LOSSES:
        raise InputError(f"unknown loss kind (valid: {', '.join(LOSSES)})", value=kind)
    builder = LOSSES[kind].entry(name)
    return builder(class_counts, **builder.config_options(train_cfg))


def build_classification_loss(
    name: str,
    *,
    class_counts: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A loss ``loss(logits, labels)`` by name (:data:`CLASSIFICATION_LOSSES`).

    ``balanced_softmax``, ``logit_adjusted`` and ``ldam`` need ``class_counts`` (train count
    per class); ``kwargs`` go to the loss' constructor (``ce``: ``nn.CrossEntropyLoss``;
    None ones left out: the constructor's default applies).

    Raises:
        InputError: an unknown name (listing the valid ones), missing class counts, or the
            constructor's own errors.
    """
    return CLASSIFICATION_LOSSES.create(name, class_counts=class_counts, **kwargs)


def build_feature_loss(name: str, **kwargs: Any) -> nn.Module:
    """A metric loss ``loss(features, labels)`` by name (:data:`FEATURE_LOSSES`), to be added
    to the cross-entropy with a weight: ``range`` → :class:`RangeLoss`, ``lifted`` →
    :class:`LiftedStructureLoss` (``kwargs`` as for :func:`build_classification_loss`).

    Raises:
        InputError: an unknown name (listing the valid ones), or the constructor's errors.
    """
    return FEATURE_LOSSES.create(name, **kwargs)


# The built-in losses, in the order the config's messages list them.
register_loss("classification", "ce", nn.CrossEntropyLoss,
              options={"label_smoothing": "label_smoothing"}, takes_class_weights=True)
register_loss("classification", "focal", FocalLoss, options={"gamma": "focal_gamma"})
register_loss("classification", "balanced_softmax", BalancedSoftmaxLoss, needs_class_counts=True)
register_loss("classification", "logit_adjusted", LogitAdjustedLoss,
              options={"tau": "logit_adjust_tau"}, needs_class_counts=True)
register_loss("classification", "ldam", LDAMLoss,
              options={"max_margin": "ldam_max_margin", "scale": "ldam_scale"},
              needs_class_counts=True, takes_class_weights=True)
register_loss("feature", "range", RangeLoss, options={"margin": "feature_loss_margin"})
register_loss("feature", "lifted", LiftedStructureLoss, options={"margin": "feature_loss_margin"})
_CENTROID_OPTIONS = {"margin": "centroid_margin", "relative": "centroid_relative_margin"}
register_loss("centroid", "nearest", NearestCentroidLoss, options=_CENTROID_OPTIONS)
register_loss("centroid", "printed", LargeMarginCentroidLoss, options=_CENTROID_OPTIONS)
register_loss("centroid", "original", _original_centroid_loss, options=_CENTROID_OPTIONS)
