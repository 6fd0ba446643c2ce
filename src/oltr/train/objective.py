"""The training objective: one module that returns named loss parts (timm's ``task`` shape).

``Objective(outputs, labels)`` → ``{"loss": total, "classification": …, "feature": …,
"centroid": …}`` for a network's :class:`~oltr.models.NetworkOutput` (``logits``,
``features`` = v_direct, ``meta``):

    L = L_cls(logits, y) + w_f · L_feature(v_direct, y) + λ · L_centroid(v, y, C)   (Eq. 7)

with ``L_cls`` of ``train.loss`` (cross-entropy, focal, balanced softmax, logit-adjusted, LDAM;
the margin loss of a CosFace/ArcFace head), deferred re-weighting of its class weights from
``train.drw_epoch`` on (Cao et al. 2019), the metric loss ``train.feature_loss`` and OLTR's
centroid loss ``train.centroid_loss`` on the memory's centroids C (`oltr.losses`). Each is
looked up by name in its registry and built from the ``train`` section
(:func:`oltr.losses.loss_from_config`), so a loss added with :func:`oltr.losses.register_loss`
trains like a built-in one.

``TrainTask(net, objective)`` is what a step calls and what DDP wraps: ``task(images, labels)``
runs the network and the objective in one forward, so every parameter the loss touches (the
centroids too) is seen by DDP's gradient all-reduce.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from oltr.errors import InputError
from oltr.losses import CLASSIFICATION_LOSSES, LossBuilder, drw_class_weights, loss_from_config
from oltr.models import NetworkOutput, OLTRNetwork


def _losses_that(takes: Callable[[LossBuilder], bool]) -> list[str]:
    """The registered classification losses whose builder ``takes`` says yes to, in order."""
    return [name for name, builder in CLASSIFICATION_LOSSES.items() if takes(builder)]


def check_stage_losses(train_cfg: dict[str, Any], net: OLTRNetwork | None = None,
                       stage: str | None = None) -> None:
    """The loss settings that exclude each other, and those ``net`` does not allow (a
    CosFace/ArcFace head brings its own loss; the centroid loss needs a memory).

    Label smoothing applies to a loss that reads it (:attr:`LossBuilder.takes_label_smoothing`:
    ``ce``), deferred re-weighting to one with class weights
    (:attr:`LossBuilder.takes_class_weights`: ``ce``, ``ldam``); the messages list them.

    Raises:
        InputError: naming the settings and ``stage``.
    """
    name = train_cfg["loss"]
    builder = CLASSIFICATION_LOSSES.get(name) if isinstance(name, str) else None
    if train_cfg["label_smoothing"] and not (builder and builder.takes_label_smoothing):
        smoothed = _losses_that(lambda b: b.takes_label_smoothing)
        raise InputError(f"train.label_smoothing applies to train.loss: {' or '.join(smoothed)} "
                         "only", value=name)
    if train_cfg["drw_epoch"] is not None and not (builder and builder.takes_class_weights):
        weighted = _losses_that(lambda b: b.takes_class_weights)
        raise InputError("deferred re-weighting (train.drw_epoch) needs train.loss "
                         f"{' or '.join(weighted)}", value=name)
    if net is not None and net.has_head_loss and name != "ce":
        raise InputError("a cosface/arcface head brings its own margin loss: set "
                         "train.loss: ce", value=name)
    if net is not None and train_cfg["centroid_loss"] != "none" and not net.has_memory:
        where = f" in stage '{stage}'" if stage else ""
        raise InputError(f"train.centroid_loss needs model.meta_embedding: true{where} (the "
                         "centroids live there)", value=train_cfg["centroid_loss"])


class Objective(nn.Module):
    """The loss of one stage, built from its ``train`` config (see the module docstring).

    ``train_counts`` (K,) are the train images per class (balanced softmax, LDAM, DRW). Call
    :meth:`set_epoch` at every epoch start (deferred re-weighting switches on there). The
    centroid loss reads ``net.centroids`` at every call (the memory stays the network's).

    Raises:
        InputError: settings :func:`check_stage_losses` refuses; an unknown loss name (listing
            the registered ones) and a loss constructor's own errors.
    """

    def __init__(self, train_cfg: dict[str, Any], train_counts: Any, net: OLTRNetwork,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        check_stage_losses(train_cfg, net)
        self.cfg = dict(train_cfg)
        counts = np.asarray(train_counts)
        self.train_counts = counts
        head_loss = net.head_loss(label_smoothing=train_cfg["label_smoothing"])
        self.classification: nn.Module = (
            head_loss if head_loss is not None
            else loss_from_config("classification", train_cfg["loss"], train_cfg,
                                  class_counts=counts))
        self.feature = (loss_from_config("feature", train_cfg["feature_loss"], train_cfg)
                        if train_cfg["feature_loss"] != "none" else None)
        self.centroid = (loss_from_config("centroid", train_cfg["centroid_loss"], train_cfg)
                         if train_cfg["centroid_loss"] != "none" else None)
        # the network stays its own module (a tuple keeps it out of this module's own)
        self._net = (net,)
        self.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Deferred re-weighting (Cao et al. 2019, Alg. 1): from the 1-based epoch
        ``train.drw_epoch`` on, the classification loss weighs classes by the inverse effective
        number of samples (:func:`~oltr.losses.drw_class_weights`); before it, equally."""
        start = self.cfg["drw_epoch"]
        if start is None or epoch + 1 < start:
            return
        weights = drw_class_weights(self.train_counts, self.cfg["drw_beta"])
        self.classification.weight = weights.to(self.device)

    def forward(self, outputs: NetworkOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 7 for a batch's network ``outputs`` and ``labels`` (B,): the named parts
        (scalars) and their weighted sum ``loss``, the losses computed in float32."""
        parts: dict[str, torch.Tensor] = {}
        parts["classification"] = self.classification(outputs.logits.float(), labels)
        total = parts["classification"]
        if self.feature is not None:
            parts["feature"] = self.feature(outputs.features.float(), labels)
            total = total + self.cfg["feature_loss_weight"] * parts["feature"]
        if self.centroid is not None:
            feature = outputs.features if self.cfg["centroid_feature"] == "direct" \
                else outputs.meta
            centroids = self._net[0].centroids
            assert feature is not None and centroids is not None
            parts["centroid"] = self.centroid(feature.float(), labels, centroids)
            total = total + self.cfg["centroid_weight"] * parts["centroid"]
        parts["loss"] = total
        return parts


class TrainTask(nn.Module):
    """``task(images, labels)`` → (loss parts, logits): the network and its objective in one
    forward, the module DDP wraps (so the centroids' gradient is all-reduced too) and
    ``train.compile`` compiles. ``from_frozen=True``: the inputs are rows of the frozen-backbone
    feature cache (`oltr.features`) and the network runs from its split point
    (``net.forward_from_frozen``)."""

    def __init__(self, net: OLTRNetwork, objective: Objective, *, from_frozen: bool = False
                 ) -> None:
        super().__init__()
        self.net = net
        self.objective = objective
        self.from_frozen = from_frozen

    def forward(self, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        outputs = self.net.forward_from_frozen(images) if self.from_frozen else self.net(images)
        return self.objective(outputs, labels), outputs.logits

    def train(self, mode: bool = True) -> TrainTask:
        super().train(mode)
        self.net.train(mode)  # a frozen backbone's BatchNorm stays in eval mode
        return self
