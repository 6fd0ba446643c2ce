"""Visual memory and dynamic meta-embedding (paper §3.1, Eq. 1–4)."""
from __future__ import annotations

import torch
from torch import nn

from oltr.errors import InputError


def reachability(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``γ_b = min_i ‖v_b − c_i‖₂`` for features (B, d) and centroids (K, d) → (B,).

    Computed in float32 with ``torch.cdist`` (a B×K matrix, never a B×K×d expansion).
    """
    if features.ndim != 2 or centroids.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise InputError(
            "reachability needs features (B, d) and centroids (K, d)",
            value=(tuple(features.shape), tuple(centroids.shape)),
        )
    distances = torch.cdist(features.float(), centroids.float())
    return distances.min(dim=1).values


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class, (K, d): the memory's initial centroids (paper §3.1).

    Vectorised with ``index_add_``; every class in ``0..K-1`` needs at least one sample.
    """
    labels = labels.long()
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise InputError(
            "class_means needs features (N, d) and labels (N,)",
            value=(tuple(features.shape), tuple(labels.shape)),
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(f"labels must lie in 0..{num_classes - 1}", value=labels.unique().tolist())
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"{len(empty)} classes have no sample (first: {empty[:10]})")
    return (sums / counts.unsqueeze(1)).to(features.dtype)


class MetaEmbedding(nn.Module):
    """Dynamic meta-embedding over a visual memory of K class centroids (Eq. 1–4).

    - memory feature (Eq. 1): ``o = softmax(T_hal(v))``, ``v_memory = o @ C``, T_hal = Linear(d→K)
    - concept selector (Eq. 4): ``e = tanh(T_sel(v))``, T_sel = Linear(d→d)
    - reachability (Eq. 3): ``γ = min_i ‖v − c_i‖₂``
    - meta-embedding (Eq. 2): ``v_meta = (s/γ)·(v + e ⊙ v_memory)`` with s = 10 as in the
      original code (the paper writes 1/γ); γ is clamped at ``eps``.

    ``detach_memory=True`` computes v_memory and γ with detached centroids, so the classifier's
    loss does not move the memory and only the centroid loss does (the original code passes
    ``centroids.data``).

    Ablations: ``use_memory=False`` → ``(s/γ)·v`` (no T_hal, no T_sel); ``use_selector=False``
    → e = 1; ``use_reachability=False`` → ``v + e ⊙ v_memory`` (neither s nor 1/γ).

    ``centroids`` is a parameter (K, d), zero until ``init_centroids`` (or a loaded state
    dict) sets it; the ``initialized`` buffer records that, and the training code should check
    it, as ``forward`` does not (that would synchronise with the device on every call).
    """

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        *,
        use_memory: bool = True,
        use_selector: bool = True,
        use_reachability: bool = True,
        reachability_scale: float = 10.0,
        learn_reachability_scale: bool = False,
        detach_memory: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not reachability_scale > 0:
            raise InputError("reachability_scale must be > 0", value=reachability_scale)
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.use_memory = use_memory
        self.use_selector = use_memory and use_selector
        self.use_reachability = use_reachability
        self.detach_memory = detach_memory
        self.eps = eps
        self.centroids = nn.Parameter(torch.zeros(num_classes, feat_dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.hallucinator = nn.Linear(feat_dim, num_classes) if use_memory else None
        self.selector = nn.Linear(feat_dim, feat_dim) if self.use_selector else None
        scale = torch.tensor(float(reachability_scale))
        if learn_reachability_scale:
            self.reachability_scale = nn.Parameter(scale)
        else:
            self.register_buffer("reachability_scale", scale)

    @torch.no_grad()
    def init_centroids(self, centroids: torch.Tensor) -> None:
        """Copy class means (K, d) into the memory and mark it initialised."""
        if tuple(centroids.shape) != tuple(self.centroids.shape):
            raise InputError(
                f"centroids must have shape {tuple(self.centroids.shape)}",
                value=tuple(centroids.shape),
            )
        if not torch.isfinite(centroids).all():
            raise InputError("centroids contain NaN or inf values")
        self.centroids.copy_(centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_hallucinator_from(self, linear: nn.Linear) -> None:
        """Copy a stage-1 linear classifier (d→K, with bias) into T_hal, as the original does."""
        if self.hallucinator is None:
            raise InputError("this meta-embedding has no memory (use_memory=False)")
        if linear.weight.shape != self.hallucinator.weight.shape or linear.bias is None:
            raise InputError(
                f"the classifier must be Linear({self.feat_dim}→{self.num_classes}) with bias",
                value=tuple(linear.weight.shape),
            )
        self.hallucinator.weight.copy_(linear.weight)
        self.hallucinator.bias.copy_(linear.bias)

    def forward(self, v_direct: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Return ``meta`` (B, d), ``reachability`` γ (B,), and ``memory``, ``selector``,
        ``coefficients`` (None where an ablation switch removes them; e = 1 without a selector).
        """
        centroids = self.centroids.detach() if self.detach_memory else self.centroids
        gamma = reachability(v_direct, centroids)
        memory = selector = coefficients = None
        combined = v_direct
        if self.hallucinator is not None:
            coefficients = self.hallucinator(v_direct).softmax(dim=1)
            memory = coefficients @ centroids
            if self.selector is not None:
                selector = torch.tanh(self.selector(v_direct))
                combined = v_direct + selector * memory
            else:
                combined = v_direct + memory
        if self.use_reachability:
            weight = self.reachability_scale / gamma.clamp_min(self.eps)
            meta = weight.unsqueeze(1) * combined
        else:
            meta = combined
        return {
            "meta": meta,
            "reachability": gamma,
            "memory": memory,
            "selector": selector,
            "coefficients": coefficients,
        }

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, num_classes={self.num_classes}, "
            f"use_memory={self.use_memory}, use_selector={self.use_selector}, "
            f"use_reachability={self.use_reachability}"
        )
