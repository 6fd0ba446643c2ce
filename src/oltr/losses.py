"""Losses between features and the visual memory's centroids (paper Eq. 7, 9; DESIGN.md §3).

Each loss is an ``nn.Module`` called as ``loss(features, labels, centroids)``: the centroids
belong to the network's memory (``MetaEmbedding.centroids``), not to the loss, so the memory
and the loss always see the same tensor. Which features to pass (``v_direct``, where the
centroids live, or ``v_meta`` as Eq. 9 is printed) is the caller's choice.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from oltr.errors import InputError

CENTROID_LOSS_FORMS = ("paper", "original")
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


class LargeMarginCentroidLoss(nn.Module):
    """Large-margin loss of Eq. 9, averaged over the batch:

    ``L = mean_b max(0, ‖v_b − c_{y_b}‖ − Σ_{i≠y_b} ‖v_b − c_i‖ + m)``  (paper: m = 5, λ = 0.1).

    Distances are Euclidean (not squared), computed with ``torch.cdist``. The repelling sum
    runs over all K − 1 other centroids, as printed, so it grows with K and the hinge is
    mostly inactive unless the features are close to several centroids.
    """

    def __init__(self, margin: float = 5.0) -> None:
        super().__init__()
        if margin < 0:
            raise InputError("margin must be >= 0", value=margin)
        self.margin = float(margin)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
    ) -> torch.Tensor:
        _check_inputs(features, labels, centroids)
        distances = torch.cdist(features.float(), centroids.float())  # (B, K)
        own = distances.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        others = distances.sum(dim=1) - own
        return (own - others + self.margin).clamp_min(0).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}"


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


def build_centroid_loss(form: str = "paper", **kwargs) -> nn.Module:
    """``paper`` → :class:`LargeMarginCentroidLoss`, ``original`` → :class:`OriginalCentroidLoss`."""
    if form == "paper":
        return LargeMarginCentroidLoss(**kwargs)
    if form == "original":
        return OriginalCentroidLoss(**kwargs)
    raise InputError(
        f"unknown centroid loss form (valid: {', '.join(CENTROID_LOSS_FORMS)})", value=form
    )
