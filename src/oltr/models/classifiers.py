"""Classifier heads: a plain linear layer, the cosine classifier with squashing (Eq. 6), and
the competing methods' heads: τ-normalisation and learnable weight scaling (Kang et al. 2020),
and few-shot learning without forgetting (Gidaris & Komodakis 2018)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from oltr.errors import InputError

SQUASH_FORMS = ("paper", "original", "unit")


class LinearClassifier(nn.Linear):
    """``logits = W v + b`` (the plain model's classifier; stage 1 of OLTR)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__(in_dim, num_classes, bias=True)


def squash(v: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Shrink each row of ``v`` (..., d) to a length below 1, keeping its direction.

    ``paper`` (Eq. 6):    (‖v‖²/(1+‖v‖²)) · v/‖v‖  =  v · ‖v‖/(1+‖v‖²)
    ``original`` (code):  (‖v‖/(1+‖v‖)) · v/‖v‖    =  v / (1+‖v‖)
    ``unit``:             v/‖v‖  (no squashing: a plain cosine classifier, e.g. LDAM's)
    The first two are written without dividing by ‖v‖, so v = 0 maps to 0 with finite gradients.
    """
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    if form == "paper":
        return v * (norm / (1.0 + norm * norm))
    if form == "original":
        return v / (1.0 + norm)
    if form == "unit":
        return F.normalize(v, dim=-1)
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


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """τ-normalised classifier weights (Kang et al., "Decoupling Representation and Classifier
    for Long-Tailed Recognition", ICLR 2020, §4): ``w̃_k = w_k / ‖w_k‖^τ``, rows of (K, d).

    τ = 0 returns the weights unchanged, τ = 1 unit rows. A new tensor; the bias, if the
    classifier has one, is left to the caller (Kang et al. normalise the weights only).
    """
    if weight.ndim != 2:
        raise InputError("tau_normalize needs a weight matrix (K, d)", value=tuple(weight.shape))
    if not (math.isfinite(tau) and tau >= 0):
        raise InputError("tau must be a finite number >= 0", value=tau)
    norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    return weight / norms.clamp_min(torch.finfo(weight.dtype).tiny).pow(tau)


def _num_classes(classifier: nn.Module) -> int:
    weight = getattr(classifier, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise InputError("the wrapped classifier needs a weight matrix (K, d)",
                         value=type(classifier).__name__)
    return weight.shape[0]


class LearnableWeightScaling(nn.Module):
    """Learnable weight scaling, LWS (Kang et al., ICLR 2020, §4): ``logits_k = f_k · φ_k(v)``.

    Wraps a trained classifier φ (any head with a ``weight`` (K, d), e.g.
    :class:`LinearClassifier`) whose parameters are frozen here; only the per-class scales f
    (initialised to 1, so the output starts equal to φ's) are learned. For a linear φ this
    scales each row of W and its bias, ``f_k (w_k·v + b_k)``, as Kang et al.'s code does.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(_num_classes(classifier)))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.classifier(v) * self.scales


class WeightGenerator(nn.Module):
    """Attention-based weight generator of Gidaris & Komodakis ("Dynamic Few-Shot Visual
    Learning without Forgetting", CVPR 2018, §3.2, Eq. 2–3):

    ``w' = φ_avg ⊙ w_avg + φ_att ⊙ w_att``, with ``w_avg = mean_i z̄_i`` (the class' mean
    L2-normalised feature) and ``w_att = Σ_b softmax_b(γ · cos(Q w_avg, w̄_b)) · w̄_b``
    over the base classes' normalised weights w̄_b.

    Simplifications, stated: the keys are the base weights themselves (the paper learns a
    separate key per base class), and the attention is computed once from the class mean
    w_avg (the paper averages per-example attentions; the same for one shot). Learned:
    φ_avg, φ_att (init 1), Q (init identity) and the inverse temperature γ.
    """

    def __init__(self, dim: int, *, attention_scale: float = 10.0) -> None:
        super().__init__()
        if not (math.isfinite(attention_scale) and attention_scale > 0):
            raise InputError("attention_scale must be a finite number > 0", value=attention_scale)
        self.phi_avg = nn.Parameter(torch.ones(dim))
        self.phi_att = nn.Parameter(torch.ones(dim))
        self.query = nn.Parameter(torch.eye(dim))
        self.attention_scale = nn.Parameter(torch.tensor(float(attention_scale)))

    def attention(self, prototypes: torch.Tensor, base_weights: torch.Tensor) -> torch.Tensor:
        """``softmax_b(γ · cos(Q w_avg, w̄_b))``: (T, B) for prototypes (T, d), bases (B, d)."""
        queries = F.normalize(prototypes @ self.query.t(), dim=1)
        cosines = queries @ F.normalize(base_weights, dim=1).t()
        return torch.softmax(self.attention_scale * cosines, dim=1)

    def forward(self, prototypes: torch.Tensor, base_weights: torch.Tensor) -> torch.Tensor:
        """Weights (T, d) of T classes from their mean normalised features ``prototypes``."""
        if (prototypes.ndim != 2 or base_weights.ndim != 2
                or prototypes.shape[1] != base_weights.shape[1]):
            raise InputError("the weight generator needs prototypes (T, d) and base weights "
                             "(B, d)", value=(tuple(prototypes.shape), tuple(base_weights.shape)))
        attended = self.attention(prototypes, base_weights) @ F.normalize(base_weights, dim=1)
        return self.phi_avg * prototypes + self.phi_att * attended


class FSLwFClassifier(nn.Module):
    """Few-shot learning without forgetting, FSLwF (Gidaris & Komodakis, CVPR 2018), with the
    tail classes as the novel ones: ``logits_k = s · cos(v, w_k)`` (no squashing, learnable
    scale s), where a tail class' weight w_k is generated by :class:`WeightGenerator` from
    its prototype once :meth:`update_prototypes` has been called, and learned directly
    before (stage 1 trains all K rows as a plain cosine classifier; a base class' row is
    always the learned one and serves as the generator's attention key and value).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        tail_classes: Sequence[int],
        *,
        scale: float = 10.0,
        learn_scale: bool = True,
        attention_scale: float = 10.0,
    ) -> None:
        super().__init__()
        tail = sorted({int(k) for k in tail_classes})
        if not tail or tail[0] < 0 or tail[-1] >= num_classes or len(tail) == num_classes:
            raise InputError("tail_classes must be a non-empty proper subset of "
                             f"0..{num_classes - 1}", value=list(tail_classes))
        if not (math.isfinite(scale) and scale > 0):
            raise InputError("FSLwF scale must be a finite number > 0", value=scale)
        self.in_dim, self.num_classes = in_dim, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(in_dim), 1.0 / math.sqrt(in_dim))
        scale_tensor = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(scale_tensor)
        else:
            self.register_buffer("scale", scale_tensor)
        self.generator = WeightGenerator(in_dim, attention_scale=attention_scale)
        is_tail = torch.zeros(num_classes, dtype=torch.bool)
        is_tail[tail] = True
        self.register_buffer("tail_classes", torch.tensor(tail))
        self.register_buffer("base_classes", torch.nonzero(~is_tail).flatten())
        self.register_buffer("tail_prototypes", torch.zeros(len(tail), in_dim))
        self.register_buffer("has_prototypes", torch.tensor(False))
        self._fixed_weights: torch.Tensor | None = None  # fix_class_weights (not state)

    @torch.no_grad()
    def update_prototypes(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store each tail class' mean L2-normalised feature (``w_avg``) from training
        ``features`` (N, d) and ``labels`` (N,); samples of base classes are ignored."""
        if features.ndim != 2 or features.shape[1] != self.in_dim or labels.shape != (
                features.shape[0],):
            raise InputError(f"update_prototypes needs features (N, {self.in_dim}) and labels "
                             "(N,)", value=(tuple(features.shape), tuple(labels.shape)))
        labels = labels.to(self.tail_classes.device).long()
        members = labels.unsqueeze(0) == self.tail_classes.unsqueeze(1)  # (T, N)
        counts = members.sum(dim=1)
        if bool((counts == 0).any()):
            missing = self.tail_classes[counts == 0].tolist()
            raise InputError(f"tail classes without a sample: {missing[:10]}")
        normalised = F.normalize(features.to(self.tail_prototypes).float(), dim=1)
        self.tail_prototypes.copy_(members.float() @ normalised / counts.unsqueeze(1))
        self.has_prototypes.fill_(True)

    @torch.no_grad()
    def fix_class_weights(self) -> None:
        """Evaluate :meth:`class_weights` once and return that constant (K, d) from now on:
        the weight rows depend on the trained state only, so a traced graph (ONNX export)
        needs no branch on the ``has_prototypes`` buffer. For a copy that is not trained any
        more (the constant is not a parameter, nor part of the state dict)."""
        self._fixed_weights = self.class_weights().detach().clone()

    def class_weights(self) -> torch.Tensor:
        """The K weight rows in use: learned rows, tail rows generated once prototypes exist
        (the constant of :meth:`fix_class_weights` once that was called)."""
        if self._fixed_weights is not None:
            return self._fixed_weights
        if not bool(self.has_prototypes):
            return self.weight
        generated = self.generator(self.tail_prototypes, self.weight[self.base_classes])
        return self.weight.index_copy(0, self.tail_classes, generated)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        unit_weight = F.normalize(self.class_weights(), dim=1)
        return self.scale * (F.normalize(v, dim=1) @ unit_weight.t())

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_classes={self.num_classes}, "
                f"tail_classes={len(self.tail_classes)}")
