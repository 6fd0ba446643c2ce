"""The network head a detector may re-run: a callable features ``(N, d)`` → logits ``(N, K)``.

ReAct, ASH and SCALE change the pooled direct features v_direct and push them through the
head again; ViM needs the head's logits and, for its origin, a *linear* head's W and b. A head
is any callable on a float tensor — :class:`LinearHead` (``v Wᵀ + b``), an ``nn.Linear``, or
:func:`network_head` of an :class:`~oltr.models.network.OLTRNetwork` (its ``forward_head``,
meta-embedding and cosine classifier included). Detectors call it under ``torch.no_grad()`` in
blocks of rows, with the features in the dtype and on the device they were given.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from oltr.errors import InputError
from oltr.openset import _as_float_tensor

Head = Callable[[torch.Tensor], torch.Tensor]

_HEAD_ROWS = 8192  # rows per head call (bounds the memory of a network head)


class LinearHead:
    """A linear classifier ``logits = v Wᵀ + b`` with W (K, d) and b (K,).

    A snapshot of W and b (copies), computed in the wider of the features' and the weights'
    dtypes, on the features' device. Build one from stored arrays (e.g. τ-normalised weights),
    or from a module with :meth:`from_module`.

    Raises:
        InputError: W is not 2-D and finite, or b is not (K,) and finite.
    """

    def __init__(self, weight: torch.Tensor | Any, bias: torch.Tensor | Any | None = None) -> None:
        self.weight = _as_float_tensor("head weight", torch.as_tensor(weight).detach().clone())
        if bias is None:
            bias = torch.zeros(self.weight.shape[0], dtype=self.weight.dtype)
        bias = torch.as_tensor(bias).detach().clone()
        if bias.shape != (self.weight.shape[0],):
            raise InputError(f"head bias must have shape ({self.weight.shape[0]},) like the "
                             "rows of the weight", value=tuple(bias.shape))
        self.bias = _as_float_tensor("head bias", bias[None, :])[0].to(self.weight.device)

    @classmethod
    def from_module(cls, module: nn.Module) -> LinearHead:
        """The weight and bias of an ``nn.Linear`` (e.g. a plain model's
        ``net.linear_classifier()``).

        Raises:
            InputError: ``module`` is not an ``nn.Linear``.
        """
        if not isinstance(module, nn.Linear):
            raise InputError("a linear head needs an nn.Linear module",
                             value=type(module).__name__)
        return cls(module.weight, module.bias)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(features.dtype, self.weight.dtype)
        weight = self.weight.to(device=features.device, dtype=dtype)
        return features.to(dtype) @ weight.t() + self.bias.to(device=features.device, dtype=dtype)

    def __repr__(self) -> str:
        return f"LinearHead(classes={self.weight.shape[0]}, dim={self.weight.shape[1]})"


class NetworkHead:
    """``net.forward_head(v).logits`` with v moved to the network's device and dtype (the
    meta-embedding and any classifier included). The network must be in eval mode."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        parameter = next(self.net.parameters())
        return self.net.forward_head(features.to(device=parameter.device,
                                                 dtype=parameter.dtype)).logits

    def __repr__(self) -> str:
        return f"NetworkHead({type(self.net).__name__})"


def network_head(net: nn.Module) -> Head:
    """The head of an :class:`~oltr.models.network.OLTRNetwork`, v_direct → logits.

    A :class:`LinearHead` when that map is one ``nn.Linear`` (no meta-embedding, a linear
    classifier: the plain model, cRT), so ViM can use its W and b; otherwise a
    :class:`NetworkHead` (OLTR's meta-embedding + cosine classifier, LWS, FSLwF).

    Raises:
        InputError: ``net`` has no ``forward_head``, or is in training mode (dropout would
            make the logits random).
    """
    if not callable(getattr(net, "forward_head", None)):
        raise InputError("network_head needs a network with forward_head (an OLTRNetwork)",
                         value=type(net).__name__)
    if net.training:
        raise InputError("network_head needs the network in eval mode: call net.eval() first")
    linear = net.linear_classifier()
    return LinearHead.from_module(linear) if linear is not None else NetworkHead(net)


def checked_head(detector: str, head: Head) -> Head:
    """``head`` as a detector's ``score`` runs it: :func:`head_logits` (checked, without
    gradients, in blocks of rows, float64). The detectors' formulas call their head directly,
    so ``score`` passes them this and ``traceable_score`` (ONNX export) the plain head."""
    def run(features: torch.Tensor) -> torch.Tensor:
        return head_logits(detector, head, features)
    return run


def head_logits(detector: str, head: Head, features: torch.Tensor) -> torch.Tensor:
    """``head(features)`` as float64 logits (N, K), computed without gradients in blocks of
    rows (``features`` are passed in their own dtype and device).

    Raises:
        InputError: ``head`` is not callable, does not return a tensor (N, K) for N rows, or
            returns non-finite logits.
    """
    if not callable(head):
        raise InputError(f"detector {detector!r}: head must be a callable features (N, d) → "
                         "logits (N, K)", value=type(head).__name__)
    blocks = []
    with torch.no_grad():
        for block in features.split(_HEAD_ROWS):
            out = head(block)
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(block):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InputError(f"detector {detector!r}: head must return logits "
                                 f"({len(block)}, K) for {len(block)} feature rows", value=got)
            blocks.append(out.detach().to(device=features.device))
    return _as_float_tensor("head logits", torch.cat(blocks)).double()
