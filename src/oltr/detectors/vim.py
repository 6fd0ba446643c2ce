"""ViM, virtual-logit matching (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with
Virtual-logit Matching", CVPR 2022, §3.2–3.3), as OpenOOD v1.5's ``vim``."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from oltr.detectors.base import ArrayLike, Detector, check_state_shape
from oltr.detectors.covariance import empirical_covariance
from oltr.detectors.head import Head, LinearHead, checked_head, head_logits
from oltr.detectors.mahalanobis import check_dimension
from oltr.errors import InputError
from oltr.openset import _as_float_tensor

VIM_ORIGINS = ("auto", "head", "mean")


def linear_head_parameters(head: Head) -> tuple[torch.Tensor, torch.Tensor]:
    """W (K, d) and b (K,) of a :class:`~oltr.detectors.head.LinearHead` or ``nn.Linear``
    (b = 0 without a bias), float64.

    Raises:
        InputError: any other head (OLTR's meta-embedding + cosine classifier has no W, b).
    """
    if isinstance(head, LinearHead):
        return head.weight.double(), head.bias.double()
    if isinstance(head, nn.Linear):
        weight = head.weight.detach().double()
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) \
            if head.bias is None else head.bias.detach().double()
        return weight, bias
    raise InputError("ViM's origin u = −W⁺b needs a linear head (LinearHead or nn.Linear); "
                     "for another head (e.g. OLTR's cosine classifier) use ViM(origin='mean')",
                     value=type(head).__name__)


class ViM(Detector):
    """``score = α ‖(x − u) R‖ − logsumexp_k z_k``, the log-odds of the virtual class in
    ``softmax([z, α ‖(x − u) R‖])`` (Wang et al.'s ViM probability, §3.3, turned into its
    logit so that it never saturates; the same ranking, and OpenOOD's and the authors' code's
    ``vlogit − energy``). z = head(x) are the logits of the features x.

    ``fit(features=..., head=...)`` on training features (Wang et al., §3.2–3.3):

    * origin u: ``−W⁺ b`` for a linear head (``origin="head"``, the paper's), where the logits
      vanish (for W of full row rank); with ``origin="mean"``, the training features' mean — the
      choice for a non-linear head such as OLTR's meta-embedding + cosine classifier, which has
      no W, b (``origin="head"`` refuses such a head with an ``InputError``); ``origin="auto"``
      (default): the paper's ``−W⁺ b`` where the head is linear, else the mean — the origin used
      is kept in ``origin_used``;
    * principal space: the D eigenvectors of largest eigenvalue of ``Σ = (1/N) Σ_i (x_i −
      u)(x_i − u)ᵀ``; R (d, d − D) spans the rest, so ‖(x − u) R‖ is the residual norm;
    * α = mean_i max_k z_ik / mean_i ‖(x_i − u) R‖ matches the virtual logit to the logits.

    Args:
        principal_dim: D, 0 <= D < d; None: d // 2 (OpenOOD v1.5's 256 for ResNet-18's 512).
        origin: ``auto`` (default), ``head`` or ``mean``.

    Inputs: ``fit(features=(N, d), head=...)``, ``score(features=(M, d), head=...)`` with
    head: features → logits (:mod:`oltr.detectors.head`).

    Returns:
        ``score``: (M,) float64, ``log(p_virtual / (1 − p_virtual))``; higher = more likely open.

    Raises:
        InputError: ``origin="head"`` with a head that is not linear; D >= d; training
            features without residual (α undefined); score features of another dimension;
            a head that does not return finite logits (N, K).
        NotFittedError: ``score`` or ``state_dict`` before ``fit``.
    """

    name: ClassVar[str] = "vim"
    inputs: ClassVar[tuple[str, ...]] = ("features", "head")
    fit_inputs = ("features", "head")
    options: ClassVar[tuple[str, ...]] = ("principal_dim", "origin")
    state_names: ClassVar[tuple[str, ...]] = ("u", "residual_basis", "alpha")

    def __init__(self, principal_dim: int | None = None, origin: str = "auto") -> None:
        if principal_dim is not None and (int(principal_dim) != principal_dim
                                          or principal_dim < 0):
            raise InputError("ViM principal_dim must be an integer >= 0 or None",
                             value=principal_dim)
        if origin not in VIM_ORIGINS:
            raise InputError(f"unknown ViM origin (valid: {', '.join(VIM_ORIGINS)})",
                             value=origin)
        self.principal_dim = None if principal_dim is None else int(principal_dim)
        self.origin = origin
        self.origin_used: str | None = None

    def _fit(self, features: ArrayLike, head: Head) -> None:
        vectors = _as_float_tensor("features", features)
        dim = vectors.shape[1]
        principal_dim = dim // 2 if self.principal_dim is None else self.principal_dim
        if principal_dim >= dim:
            raise InputError(f"ViM principal_dim must be below the feature dimension {dim}",
                             value=principal_dim)
        x = vectors.double()
        origin = self.origin
        if origin == "auto":
            origin = "head" if isinstance(head, (LinearHead, nn.Linear)) else "mean"
        if origin == "head":
            weight, bias = linear_head_parameters(head)
            if weight.shape[1] != dim:
                raise InputError(f"the head takes features of dimension {weight.shape[1]}, "
                                 f"not {dim}")
            u = -(torch.linalg.pinv(weight) @ bias).to(x.device)
        else:
            u = x.mean(dim=0)
        _, eigenvectors = torch.linalg.eigh(empirical_covariance(x - u))  # ascending
        basis = eigenvectors[:, : dim - principal_dim].contiguous()  # as a restored state
        residual = ((x - u) @ basis).norm(dim=1).mean()
        max_logit = head_logits(self.name, head, vectors).max(dim=1).values.mean()
        if not float(residual) > 0:
            raise InputError("ViM: the training features lie in the principal space (residual "
                             "norm 0); choose a smaller principal_dim", value=principal_dim)
        self.u, self.residual_basis, self.origin_used = u, basis, origin
        self.alpha = (max_logit / residual).to(torch.float64)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "residual_basis": self.residual_basis, "alpha": self.alpha}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_shape(self.name, "u", state["u"], (None,))
        dim = state["u"].shape[0]
        check_state_shape(self.name, "residual_basis", state["residual_basis"], (dim, None))
        check_state_shape(self.name, "alpha", state["alpha"], ())
        self.u, self.residual_basis, self.alpha = (state["u"], state["residual_basis"],
                                                   state["alpha"])

    def virtual_logit(self, features: torch.Tensor) -> torch.Tensor:
        """``α ‖(x − u) R‖`` (N,) float64 of features (N, d)."""
        x = features.double()
        basis = self.residual_basis.to(device=x.device, dtype=x.dtype)
        return self.alpha.to(x.device) * ((x - self.u.to(x.device)) @ basis).norm(dim=1)

    def _score(self, features: ArrayLike, head: Head) -> torch.Tensor:
        vectors = _as_float_tensor("features", features)
        check_dimension("ViM", vectors, self.u.shape[0])
        return self._formula(vectors, checked_head(self.name, head))

    def _formula(self, features: torch.Tensor, head: Head) -> torch.Tensor:
        return self.virtual_logit(features) - torch.logsumexp(head(features).double(), dim=1)
