"""Classifier heads: a plain linear layer and the cosine classifier with squashing (Eq. 6)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from oltr.errors import InputError

SQUASH_FORMS = ("paper", "original")


class LinearClassifier(nn.Linear):
    """``logits = W v + b`` (the plain model's classifier; stage 1 of OLTR)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__(in_dim, num_classes, bias=True)


def squash(v: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Shrink each row of ``v`` (..., d) to a length below 1, keeping its direction.

    ``paper`` (Eq. 6):    (‖v‖²/(1+‖v‖²)) · v/‖v‖  =  v · ‖v‖/(1+‖v‖²)
    ``original`` (code):  (‖v‖/(1+‖v‖)) · v/‖v‖    =  v / (1+‖v‖)
    Both are written without dividing by ‖v‖, so v = 0 maps to 0 with finite gradients.
    """
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    if form == "paper":
        return v * (norm / (1.0 + norm * norm))
    if form == "original":
        return v / (1.0 + norm)
    raise InputError(f"unknown squash form (valid: {', '.join(SQUASH_FORMS)})", value=form)


class CosineClassifier(nn.Module):
    """Cosine classifier of Eq. 6: ``logits_k = scale · ⟨squash(v), w_k/‖w_k‖⟩`` (no bias).

    A small ‖v‖ (a meta-embedding far from the memory) gives flat logits, hence low confidence.
    ``weight`` is shaped (K, d) like ``nn.Linear``; ``scale`` is a buffer, or a parameter when
    ``learn_scale`` (the key is ``scale`` in both cases, so state dicts load either way).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        scale: float = 16.0,
        squash_form: str = "paper",
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        if squash_form not in SQUASH_FORMS:
            raise InputError(
                f"unknown squash form (valid: {', '.join(SQUASH_FORMS)})", value=squash_form
            )
        if not scale > 0:
            raise InputError("cosine classifier scale must be > 0", value=scale)
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.squash_form = squash_form
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        scale_tensor = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(scale_tensor)
        else:
            self.register_buffer("scale", scale_tensor)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        unit_weight = F.normalize(self.weight, dim=1)
        return self.scale * (squash(v, self.squash_form) @ unit_weight.t())

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_classes={self.num_classes}, "
            f"scale={self.scale.item():g}, squash_form={self.squash_form!r}"
        )
