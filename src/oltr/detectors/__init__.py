"""Open-set detectors with one interface: ``fit`` (where something is learned) then ``score``,
**higher = more likely open** (docs/method.md). One file per detector, the paper and the score
formula in each docstring; they work on stored logits/features (one forward pass for all),
and those that reshape the features (ReAct, ASH, SCALE, ViM) also on the network's head.

    detector = create_detector("openmax", tail_size=20)
    detector.fit(logits=train_logits, labels=train_labels)   # a no-op where nothing is learned
    open_score = detector.score(logits=test_logits)          # (N,) float64

    head = network_head(net.eval())                          # features (N, d) → logits (N, K)
    react = create_detector("react").fit(features=train_features)
    open_score = react.score(features=test_features, head=head)

``score`` checks its inputs, then applies the detector's formula (in blocks of rows where the
memory needs it); ``traceable_score`` applies the same formula with torch operations only —
no checks of values, no numpy, no Python branch on the data — for ONNX export
(:mod:`oltr.export`). ``export_refusal()`` says why a detector cannot be traced (ODIN with
input perturbation: it needs gradients); every other detector can.

A fitted detector is saved as ``name``, ``detector.config()`` (JSON) and
``detector.state_dict()`` (tensors, e.g. for ``safetensors.torch.save_file``), and rebuilt by
:func:`restore_detector`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from oltr.detectors.ash import ASH, ash
from oltr.detectors.base import Detector, NotFittedError
from oltr.detectors.energy import Energy
from oltr.detectors.gen import GEN, generalized_entropy
from oltr.detectors.head import Head, LinearHead, NetworkHead, network_head
from oltr.detectors.knn import KNN
from oltr.detectors.mahalanobis import Mahalanobis, mahalanobis_distances
from oltr.detectors.max_logit import MaxLogit
from oltr.detectors.msp import MSP
from oltr.detectors.odin import ODIN, odin_perturb
from oltr.detectors.openmax import OpenMax, fit_weibull_tail, openmax_probabilities
from oltr.detectors.reachability import Reachability
from oltr.detectors.react import ReAct
from oltr.detectors.relative_mahalanobis import RelativeMahalanobis
from oltr.detectors.scale import SCALE, scale_activations
from oltr.detectors.vim import ViM
from oltr.errors import InputError
from oltr.registry import Registry

#: Every open-set detector by its ``name`` (``eval.open_score``, ``--detector``): the config's
#: allowed values, ``oltr bench``'s default detectors and a saved rule's open score.
DETECTORS: Registry[type[Detector]] = Registry("detector")


def register_detector(detector: type[Detector]) -> type[Detector]:
    """Class decorator: make a :class:`Detector` subclass of your own a registered open score
    under its ``name``, so that configs (``eval.open_score``), ``evaluate_run(detectors=…)``,
    ``oltr bench --detectors``, a saved :class:`~oltr.decision.DecisionRule` and ONNX export
    find it like the built-in ones (register it before loading a rule that uses it).
    Registering the same class again is a no-op.

    Raises InputError: not a Detector subclass, no ``name``, or a name already registered."""
    if not (isinstance(detector, type) and issubclass(detector, Detector)):
        raise InputError("register_detector takes a subclass of oltr.detectors.Detector",
                         value=detector)
    name = getattr(detector, "name", None)
    if not isinstance(name, str) or not name:
        raise InputError("a detector class needs a class attribute name = '…'",
                         value=detector.__name__)
    return DETECTORS.register(name, detector)


for _detector in (MSP, MaxLogit, Energy, ODIN, OpenMax, Reachability, KNN, Mahalanobis,
                  RelativeMahalanobis, ViM, ReAct, ASH, SCALE, GEN):
    register_detector(_detector)
del _detector


def list_detectors() -> list[str]:
    """The registered detector names, e.g. for a benchmark matrix."""
    return DETECTORS.names()


def create_detector(name: str, **kwargs: Any) -> Detector:
    """The detector registered as ``name``, built with ``kwargs`` (its constructor's).

    Unlike :meth:`Registry.create <oltr.registry.Registry.create>`, a None option is passed
    on: options come from a config's ``eval.open_score_options`` or a saved rule, where a
    ``null`` the constructor does not take is an error, not its default.

    Raises:
        InputError: an unknown name (listing the registered ones) or an option the
            constructor does not take.
    """
    detector = DETECTORS.entry(name)
    try:
        return detector(**kwargs)
    except TypeError as error:  # an option the constructor does not take
        raise InputError(f"detector {name!r}: bad options ({error})", value=dict(kwargs)) \
            from None


def rule_detector(name: str, options: Mapping[str, Any] | None = None) -> Detector:
    """:func:`create_detector` for a decision rule's open score, which scores stored outputs:
    InputError also for ODIN with an input perturbation (epsilon > 0), which needs gradients
    through the network for every image (evaluate it with ``--detector odin`` instead)."""
    detector = create_detector(name, **(options or {}))
    if getattr(detector, "epsilon", 0) > 0:
        raise InputError("ODIN's input perturbation (epsilon > 0) needs gradients through the "
                         "network for every image, which a decision rule (predict, export) does "
                         "not compute: use epsilon 0 (temperature only) for the rule, or score "
                         "the perturbed form with --detector odin", value=dict(options or {}))
    return detector


def restore_detector(
    name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> Detector:
    """A fitted detector rebuilt from its name, :meth:`~Detector.config` and
    :meth:`~Detector.state_dict`: ``create_detector(name, **config).load_state_dict(state)``.

    Raises:
        InputError: an unknown name or option, or a state that does not fit the detector.
    """
    return create_detector(name, **config).load_state_dict(state)


__all__ = [
    "ASH",
    "DETECTORS",
    "GEN",
    "KNN",
    "MSP",
    "ODIN",
    "SCALE",
    "Detector",
    "Energy",
    "Head",
    "LinearHead",
    "Mahalanobis",
    "MaxLogit",
    "NetworkHead",
    "NotFittedError",
    "OpenMax",
    "ReAct",
    "Reachability",
    "RelativeMahalanobis",
    "ViM",
    "ash",
    "create_detector",
    "fit_weibull_tail",
    "generalized_entropy",
    "list_detectors",
    "mahalanobis_distances",
    "network_head",
    "odin_perturb",
    "openmax_probabilities",
    "register_detector",
    "restore_detector",
    "rule_detector",
    "scale_activations",
]
