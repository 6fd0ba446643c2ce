"""The classification heads of the OLTR network by name (``model.classifier``): :data:`HEADS`.

A head builder is called as ``builder(in_dim, num_classes, options)`` and returns the module
that maps a feature ``(B, in_dim)`` to logits ``(B, num_classes)``; ``options`` holds the
network's head options (``cosine_scale``, ``squash_form``, ``learn_cosine_scale``,
``margin_scale``, ``margin``, ``arcface_easy_margin``, ``novel_classes``) and each builder reads
the ones it needs. :class:`~oltr.models.network.OLTRNetwork` builds its classifier as
``HEADS.create(classifier, feature_dim, num_classes, options)``, and the config's
``model.classifier`` accepts the registered names, so a head of one's own is a builder
registered with ``@HEADS.register("name")``.

A builder whose attribute ``needs_novel_classes`` is true (FSLwF's) is built on novel (tail)
classes: :func:`~oltr.models.network.create_network` then derives ``options["novel_classes"]``
(the classes with at most ``model.fslwf_novel_max`` train images) from the class counts
(:func:`needs_novel_classes`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from oltr.errors import InputError
from oltr.models.classifiers import (
    CosineClassifier,
    FSLwFClassifier,
    LearnableWeightScaling,
    LinearClassifier,
)
from oltr.models.margin import MarginClassifier
from oltr.registry import Registry

HeadBuilder = Callable[[int, int, Mapping[str, Any]], nn.Module]

#: ``model.classifier``: head builders ``(in_dim, num_classes, options)`` → module.
HEADS: Registry[HeadBuilder] = Registry("classifier")


def needs_novel_classes(name: Any) -> bool:
    """Whether the head registered as ``name`` is built on novel (tail) classes: its builder's
    ``needs_novel_classes`` attribute (False when it has none, or for an unknown name, which
    the network refuses with the registry's message)."""
    builder = HEADS.get(name) if isinstance(name, str) else None
    return bool(getattr(builder, "needs_novel_classes", False))


@HEADS.register("linear")
def linear_head(in_dim: int, num_classes: int, options: Mapping[str, Any]) -> nn.Module:
    """``linear``: :class:`LinearClassifier` (no options)."""
    return LinearClassifier(in_dim, num_classes)


@HEADS.register("cosine")
def cosine_head(in_dim: int, num_classes: int, options: Mapping[str, Any]) -> nn.Module:
    """``cosine`` (Eq. 6): :class:`CosineClassifier` with ``cosine_scale``, ``squash_form`` and
    ``learn_cosine_scale``."""
    return CosineClassifier(in_dim, num_classes, scale=options["cosine_scale"],
                            squash_form=options["squash_form"],
                            learn_scale=options["learn_cosine_scale"])


@HEADS.register("lws")
def lws_head(in_dim: int, num_classes: int, options: Mapping[str, Any]) -> nn.Module:
    """``lws``: a linear head with learned per-class scales (:class:`LearnableWeightScaling`)."""
    return LearnableWeightScaling(LinearClassifier(in_dim, num_classes))


@HEADS.register("fslwf")
def fslwf_head(in_dim: int, num_classes: int, options: Mapping[str, Any]) -> nn.Module:
    """``fslwf``: :class:`FSLwFClassifier` with ``cosine_scale`` on ``novel_classes``.

    Raises:
        InputError: no novel class, or every class novel.
    """
    novel_classes = options.get("novel_classes")
    if not novel_classes:
        raise InputError("the fslwf classifier needs novel (tail) classes: no class has "
                         "at most model.fslwf_novel_max train images")
    if len(novel_classes) == num_classes:
        raise InputError("the fslwf classifier needs base classes as well: every class "
                         "has at most model.fslwf_novel_max train images (lower it, "
                         "e.g. model.fslwf_novel_max=20)", value=num_classes)
    return FSLwFClassifier(in_dim, num_classes, novel_classes, scale=options["cosine_scale"])


fslwf_head.needs_novel_classes = True  # type: ignore[attr-defined]


def _margin_head(kind: str) -> Callable[[int, int, Mapping[str, Any]], nn.Module]:
    def build(in_dim: int, num_classes: int, options: Mapping[str, Any]) -> nn.Module:
        return MarginClassifier(in_dim, num_classes, kind=kind, scale=options["margin_scale"],
                                margin=options["margin"],
                                easy_margin=options["arcface_easy_margin"])

    build.__doc__ = (f"``{kind}``: :class:`MarginClassifier` with ``margin_scale``, ``margin`` "
                     "and ``arcface_easy_margin``.")
    return build


HEADS.register("cosface", _margin_head("cosface"))
HEADS.register("arcface", _margin_head("arcface"))

__all__ = ["HEADS", "HeadBuilder", "needs_novel_classes"]
