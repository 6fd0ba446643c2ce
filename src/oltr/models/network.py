"""The OLTR network: backbone → [modulated attention] → pool [→ embed] → [meta-embedding] → classifier.

One class serves every method: the plain model (stage 1) is the backbone with a linear
classifier; OLTR stage 2 adds attention (Eq. 5), the dynamic meta-embedding (Eq. 1–4) and the
cosine classifier (Eq. 6). The interface follows timm/torchvision: ``forward_features`` gives
the feature map, ``pool`` the direct feature, ``forward_head`` the logits; ``forward`` returns a
:class:`NetworkOutput`.

The network owns its seams, so that no caller reaches into its modules or checks their types:
the optimiser's parameter groups (:meth:`OLTRNetwork.parameter_groups`), the memory
(:attr:`~OLTRNetwork.has_memory`, :attr:`~OLTRNetwork.centroids`,
:meth:`~OLTRNetwork.memory_parts`, :meth:`~OLTRNetwork.init_from_features`), the head's loss
(:meth:`~OLTRNetwork.head_loss`), the linear classifier τ-normalisation, ViM and export use
(:meth:`~OLTRNetwork.direct_classifier`, :meth:`~OLTRNetwork.linear_classifier`,
:meth:`~OLTRNetwork.fix_class_weights`) and the split point of the frozen-backbone feature
cache (:attr:`~OLTRNetwork.frozen_split`, :attr:`~OLTRNetwork.frozen_part`,
:meth:`~OLTRNetwork.frozen_features`, :meth:`~OLTRNetwork.forward_from_frozen`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from oltr.errors import InputError
from oltr.models.attention import ModulatedAttention
from oltr.models.backbones import create_backbone
from oltr.models.classifiers import SQUASH_FORMS, FSLwFClassifier, LearnableWeightScaling
from oltr.models.heads import HEADS, needs_novel_classes
from oltr.models.margin import MarginClassifier
from oltr.models.memory import MetaEmbedding, class_means

#: The built-in classifier names (``model.classifier``), in registration order; the names
#: accepted are :data:`~oltr.models.heads.HEADS`'s, read when a network is built.
CLASSIFIERS = tuple(HEADS)


class NetworkOutput(NamedTuple):
    """What :meth:`OLTRNetwork.forward` (and ``forward_head``, ``forward_from_frozen``)
    returns for a batch of B inputs and K classes.

    Attributes:
        logits: (B, K) the classifier's logits (cosine classifier: Eq. 6).
        features: (B, d) the direct feature v_direct (pooled, after the embedding if any);
            never touched by dropout.
        meta: (B, d) the meta-embedding v_meta (Eq. 2), or None without a meta-embedding.
        reachability: (B,) γ (Eq. 3), or None without a meta-embedding.

    A NamedTuple (as torchvision's ``GoogLeNetOutputs``): ``torch.compile`` and
    ``torch.export`` trace through it.
    """

    logits: torch.Tensor
    features: torch.Tensor
    meta: torch.Tensor | None = None
    reachability: torch.Tensor | None = None


class OLTRNetwork(nn.Module):
    """Backbone + optional modulated attention, embedding, meta-embedding; linear or cosine head.

    ``forward(x)`` for images x (B, C_in, H, W) (and ``forward_head``) return a
    :class:`NetworkOutput`: ``logits`` (B, K), ``features`` = v_direct (B, d), ``meta`` = v_meta
    (B, d) or None, ``reachability`` = γ (B,) or None (both None without a meta-embedding).
    Dropout (if any) acts on the classifier's input only, never on ``features`` or γ.
    ``backbone`` is any module with ``feature_dim`` and ``forward_features(x)`` (e.g.
    :class:`~oltr.models.backbones.ResNetBackbone`).

    The classifier is the head registered as ``classifier`` in
    :data:`~oltr.models.heads.HEADS`, built on the feature dimension d by its builder from the
    head options (``cosine_scale``, ``squash_form``, ``learn_cosine_scale``, ``margin_scale``,
    ``margin``, ``arcface_easy_margin``, ``novel_classes``: the FSLwF head's tail classes).

    Raises:
        InputError: an unknown ``classifier`` (listing the registered heads) or
            ``squash_form``, ``dropout`` outside [0, 1), a bad ``embed_dim``, ``num_classes``
            < 1; and the head builder's errors (fslwf: no novel class, or no base class).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        classifier: str = "linear",
        cosine_scale: float = 16.0,
        squash_form: str = "paper",
        learn_cosine_scale: bool = False,
        attention: bool = False,
        modulation: bool = True,
        meta_embedding: bool = False,
        use_memory: bool = True,
        use_selector: bool = True,
        use_reachability: bool = True,
        reachability_scale: float = 10.0,
        learn_reachability_scale: bool = False,
        detach_memory: bool = False,
        embed_dim: int | None = None,
        dropout: float = 0.0,
        novel_classes: list[int] | None = None,
        margin_scale: float = 64.0,
        margin: float | None = None,
        arcface_easy_margin: bool = False,
    ) -> None:
        super().__init__()
        HEADS.entry(classifier)  # an unknown name fails first, listing the registered ones
        if squash_form not in SQUASH_FORMS:
            raise InputError(f"unknown squash_form (valid: {', '.join(SQUASH_FORMS)})", value=squash_form)
        if not 0.0 <= dropout < 1.0:
            raise InputError("dropout must lie in [0, 1)", value=dropout)
        if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim < 1):
            raise InputError("embed_dim must be a positive integer or null", value=embed_dim)
        if num_classes < 1:
            raise InputError("num_classes must be >= 1", value=num_classes)
        self.num_classes = num_classes
        self.backbone = backbone
        self.attention = (ModulatedAttention(backbone.feature_dim, use_modulation=modulation)
                          if attention else None)
        self.embed = (nn.Sequential(nn.Linear(backbone.feature_dim, embed_dim),
                                    nn.ReLU(inplace=True)) if embed_dim is not None else None)
        self.feature_dim = embed_dim if embed_dim is not None else backbone.feature_dim
        self.meta_embedding = MetaEmbedding(
            self.feature_dim, num_classes, use_memory=use_memory, use_selector=use_selector,
            use_reachability=use_reachability, reachability_scale=reachability_scale,
            learn_reachability_scale=learn_reachability_scale, detach_memory=detach_memory,
        ) if meta_embedding else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.classifier: nn.Module = HEADS.create(classifier, self.feature_dim, num_classes, {
            "cosine_scale": cosine_scale, "squash_form": squash_form,
            "learn_cosine_scale": learn_cosine_scale, "margin_scale": margin_scale,
            "margin": margin, "arcface_easy_margin": arcface_easy_margin,
            "novel_classes": novel_classes})
        self.backbone_frozen = False
        self.backbone_bn_frozen = False

    @property
    def supports_channels_last(self) -> bool:
        """False when a layer would hit a known oneDNN fault in channels-last format: the
        backward pass of a 1×1 stride-2 convolution with 2–7 input channels corrupts the heap
        (torch 2.14.1, x86-64 CPUs with AVX2 only; a width-4 small ResNet has one). Training and
        evaluation then keep the default memory format."""
        return not any(
            isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and 1 < m.in_channels < 8 for m in self.modules()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (B, C, h, w), after modulated attention when enabled."""
        fmap = self.backbone.forward_features(x)
        if self.attention is not None:
            fmap = self.attention(fmap)
        return fmap

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Direct feature v_direct (B, d): global average pool, then the embedding if any."""
        v = F.adaptive_avg_pool2d(fmap, 1).flatten(1)
        return self.embed(v) if self.embed is not None else v

    def forward_head(self, v_direct: torch.Tensor) -> NetworkOutput:
        """The head on direct features v_direct (B, d): meta-embedding (Eq. 1–4, if any),
        dropout (training only), classifier → :class:`NetworkOutput`."""
        meta = gamma = None
        head_input = v_direct
        if self.meta_embedding is not None:
            out = self.meta_embedding(v_direct)
            meta, gamma = out["meta"], out["reachability"]
            head_input = meta
        if self.dropout is not None:
            head_input = self.dropout(head_input)
        return NetworkOutput(self.classifier(head_input), v_direct, meta, gamma)

    def forward(self, x: torch.Tensor) -> NetworkOutput:
        """Images x (B, C_in, H, W) → :class:`NetworkOutput`."""
        return self.forward_head(self.pool(self.forward_features(x)))

    # ------------------------------------------------------------ the optimiser's groups
    def parameter_groups(self, train_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
        """SGD parameter groups of the trainable parameters, in this order and without the
        empty ones: ``backbone`` (lr ``train_cfg["lr_backbone"]``, or ``lr``), ``centroids``
        (the memory's C, lr ``lr_centroids`` or ``lr``, no weight decay; the original code's
        separate centroid optimiser) and ``head`` (everything else, lr ``lr``). Each group is
        ``{"name", "params", "lr"[, "weight_decay"]}``, its parameters in module order."""
        lr = train_cfg["lr"]
        groups: dict[str, dict[str, Any]] = {
            "backbone": {"params": [], "lr": train_cfg["lr_backbone"] or lr},
            "centroids": {"params": [], "lr": train_cfg["lr_centroids"] or lr,
                          "weight_decay": 0.0},
            "head": {"params": [], "lr": lr},
        }
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("backbone."):
                groups["backbone"]["params"].append(param)
            elif name.endswith("centroids"):
                groups["centroids"]["params"].append(param)
            else:
                groups["head"]["params"].append(param)
        return [{"name": key, **group} for key, group in groups.items() if group["params"]]

    # ------------------------------------------------------------ the memory (paper §3.1)
    @property
    def has_memory(self) -> bool:
        """Whether the network has the dynamic meta-embedding and its memory of centroids."""
        return self.meta_embedding is not None

    @property
    def centroids(self) -> nn.Parameter | None:
        """The memory's class centroids C (K, d), the parameter itself (the centroid loss,
        Eq. 9, trains it); None without a meta-embedding."""
        return self.meta_embedding.centroids if self.meta_embedding is not None else None

    def memory_parts(self, v_direct: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The meta-embedding's parts for direct features (B, d): ``meta`` (B, d),
        ``reachability`` (B,), ``memory`` (B, d), ``selector`` (B, d) and ``coefficients``
        (B, K), None where an ablation removes them (`MetaEmbedding.forward`, Eq. 1–4).

        Raises:
            InputError: the network has no meta-embedding.
        """
        if self.meta_embedding is None:
            raise InputError("this network has no meta-embedding (model.meta_embedding)")
        return self.meta_embedding(v_direct)

    @property
    def needs_train_features(self) -> bool:
        """Whether :meth:`init_from_features` has something to initialise: the memory's
        centroids, or an FSLwF head's novel-class prototypes."""
        return self.meta_embedding is not None or isinstance(self.classifier, FSLwFClassifier)

    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, labels: torch.Tensor, *,
                           calibrate_reachability: bool = False) -> None:
        """Initialise from the train split's direct features (N, d) and labels (N,): an FSLwF
        head's novel-class prototypes w_avg (Gidaris & Komodakis 2018, §3.2), then the
        memory's centroids as class means (paper §3.1) and, with ``calibrate_reachability``,
        the reachability scale (:meth:`calibrate_reachability_scale`). Nothing for other
        networks.

        Raises:
            InputError: a class (FSLwF: a tail class) without a sample; non-finite means.
        """
        if isinstance(self.classifier, FSLwFClassifier):
            self.classifier.update_prototypes(features, labels)
        if self.meta_embedding is not None:
            self.meta_embedding.init_centroids(class_means(features, labels, self.num_classes))
            if calibrate_reachability:
                self.calibrate_reachability_scale(features)

    @torch.no_grad()
    def calibrate_reachability_scale(self, features: torch.Tensor) -> float:
        """Set s in v_meta = (s/γ)·(v_direct + e ⊙ v_memory) (Eq. 2) so that the median
        ‖v_meta‖ over direct ``features`` (N, d) is 1, the middle of the squashing function
        (Eq. 6: ‖v‖²/(1+‖v‖²) = ½); returns s.

        With a fixed s (the original's 10) ‖v_meta‖ can sit far into the flat part of the
        squash, where 1/γ no longer changes the logits and reachability cannot lower an open
        input's confidence; this keeps the scaling where it acts.

        Raises:
            InputError: the network has no meta-embedding.
        """
        memory = self.meta_embedding
        if memory is None:
            raise InputError("this network has no meta-embedding (model.meta_embedding)")
        memory.reachability_scale.fill_(1.0)
        norms = torch.cat([memory(chunk)["meta"].norm(dim=1) for chunk in features.split(1024)])
        scale = 1.0 / float(norms.median().clamp_min(1e-12))
        memory.reachability_scale.fill_(scale)
        return scale

    # ------------------------------------------------------------ the head, as others use it
    @property
    def has_head_loss(self) -> bool:
        """Whether the head brings its own training loss (CosFace / ArcFace: the margin lives
        in the loss, :meth:`head_loss`)."""
        return isinstance(self.classifier, MarginClassifier)

    def head_loss(self, **ce_kwargs: Any) -> nn.Module | None:
        """The training loss ``loss(logits, labels)`` a CosFace / ArcFace head brings (same s
        and m, ``ce_kwargs`` e.g. ``label_smoothing`` passed on); None for other heads."""
        if isinstance(self.classifier, MarginClassifier):
            return self.classifier.margin_loss(**ce_kwargs)
        return None

    def direct_classifier(self) -> nn.Module | None:
        """The classifier when it acts on v_direct itself (no meta-embedding) and holds a
        weight matrix ``weight`` (K, d) (and maybe ``bias`` (K,)): what τ-normalisation
        rescales (Kang et al. 2020); None otherwise (a meta-embedding, LWS)."""
        weight = getattr(self.classifier, "weight", None)
        if self.meta_embedding is None and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return self.classifier
        return None

    def linear_classifier(self) -> nn.Linear | None:
        """The classifier when the whole head v_direct → logits is one ``nn.Linear`` (no
        meta-embedding, a linear classifier: the plain model, cRT), e.g. for ViM's W and b
        and τ-normalisation in export; None otherwise."""
        if self.meta_embedding is None and isinstance(self.classifier, nn.Linear):
            return self.classifier
        return None

    def fix_class_weights(self) -> OLTRNetwork:
        """Evaluate the classifier's class weights once and use them as constants from now on
        (an FSLwF head: learned rows, generated tail rows once prototypes exist), so that a
        traced graph (ONNX export) has no branch on its ``has_prototypes`` buffer; other heads
        are unchanged. For a copy that is not trained any more. Returns ``self``."""
        if isinstance(self.classifier, FSLwFClassifier):
            self.classifier.fix_class_weights()
        return self

    # ------------------------------------------------------------ the frozen-backbone split
    @property
    def frozen_split(self) -> str:
        """Where a frozen backbone ends (``train.freeze_backbone``), the split point of the
        feature cache (`oltr.features`): ``"feature_map"`` — the backbone's last feature map
        (B, C, h, w) — when modulated attention (trainable) follows it, else ``"pooled"`` — its
        global average pool (B, C), since pooling has no parameters. Everything after the
        split (attention, embedding, meta-embedding, classifier) stays trainable."""
        return "feature_map" if self.attention is not None else "pooled"

    @property
    def frozen_part(self) -> nn.Module:
        """The module before the split point, frozen by ``train.freeze_backbone`` (the
        backbone): its state is what the feature cache's key covers."""
        return self.backbone

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the frozen part for images ``x`` (B, C_in, H, W): the backbone's
        feature map (B, C, h, w) or its average pool (B, C), as :attr:`frozen_split` says.
        ``forward_from_frozen(frozen_features(x))`` computes ``forward(x)``."""
        fmap = self.backbone.forward_features(x)
        if self.attention is not None:
            return fmap
        return F.adaptive_avg_pool2d(fmap, 1).flatten(1)

    def contiguous_after_split(self) -> OLTRNetwork:
        """Put the trainable modules after the split point (modulated attention's 1×1
        convolutions) in the default, contiguous memory format; the frozen backbone keeps its
        format. For training on cached feature-map rows, which are stored contiguous
        (N, C, h, w): with channels-last weights there, oneDNN converts the layout around every
        convolution, forward and backward (`benchmarks/speed.py`'s cached-rows row measures the
        epoch). Values are unchanged. Returns ``self``."""
        if self.attention is not None:
            self.attention.to(memory_format=torch.contiguous_format)
        return self

    def forward_from_frozen(self, frozen: torch.Tensor) -> NetworkOutput:
        """``forward`` from the split point on: ``frozen`` is what :meth:`frozen_features`
        returns (a row of the feature cache); returns the :class:`NetworkOutput` of
        :meth:`forward_head`."""
        if self.attention is not None:
            return self.forward_head(self.pool(self.attention(frozen)))
        v = self.embed(frozen) if self.embed is not None else frozen
        return self.forward_head(v)

    def train(self, mode: bool = True) -> OLTRNetwork:
        """As ``nn.Module.train``, but a frozen backbone's BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode and self.backbone_bn_frozen:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def _base_model_defaults() -> dict[str, Any]:
    """The ``model`` section of ``configs/base.yaml``, where every config default lives (read
    here directly: :mod:`oltr.config` sits above this module)."""
    from pathlib import Path

    from oltr.io import read_yaml_file

    base = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
    return read_yaml_file(base, "config file")["model"]


#: Options of :func:`create_network` that are not config keys (Python API only).
_PYTHON_ONLY_DEFAULTS: dict[str, Any] = {"learn_cosine_scale": False}
_DEFAULT_VALUES = {**_base_model_defaults(), **_PYTHON_ONLY_DEFAULTS}
#: The options of :func:`create_network` (in the order its messages list them) and their
#: defaults: those of the ``model`` section of ``configs/base.yaml``, the one default source
#: (e.g. ``backbone: resnet10_small``), plus :data:`_PYTHON_ONLY_DEFAULTS`.
NETWORK_DEFAULTS: dict[str, Any] = {
    key: _DEFAULT_VALUES[key] for key in (
        "backbone", "width", "pretrained_path", "classifier", "cosine_scale", "squash_form",
        "learn_cosine_scale", "attention", "modulation", "meta_embedding", "use_memory",
        "use_selector", "use_reachability", "reachability_scale", "learn_reachability_scale",
        "detach_memory", "embed_dim", "dropout", "margin_scale", "margin",
        "arcface_easy_margin", "fslwf_novel_max",
    )
}


def create_network(
    cfg: Mapping[str, Any],
    num_classes: int,
    in_chans: int,
    class_counts: Sequence[int] | None = None,
) -> OLTRNetwork:
    """Build an :class:`OLTRNetwork` from a flat dict (keys of ``NETWORK_DEFAULTS``).

    Missing keys take the defaults; unknown keys raise ``InputError`` naming them.
    ``class_counts`` (train images per class) is needed only by a head built on novel classes
    (:func:`~oltr.models.heads.needs_novel_classes`: ``fslwf``): its novel classes are those
    with at most ``fslwf_novel_max`` images.

    Raises:
        InputError: unknown keys; such a head without one count per class; and the errors of
            :class:`OLTRNetwork` and of the backbone.
    """
    unknown = sorted(set(cfg) - set(NETWORK_DEFAULTS))
    if unknown:
        raise InputError(
            f"unknown model config keys: {', '.join(unknown)} "
            f"(valid: {', '.join(NETWORK_DEFAULTS)})"
        )
    options = {**NETWORK_DEFAULTS, **cfg}
    if options["reachability_scale"] == "auto":  # calibrated by the engine at stage start
        options["reachability_scale"] = 1.0
    novel_max = options.pop("fslwf_novel_max")
    if needs_novel_classes(options["classifier"]):
        if class_counts is None or len(class_counts) != num_classes:
            raise InputError(f"the {options['classifier']} classifier needs the train count "
                             "of every class")
        options["novel_classes"] = [k for k, n in enumerate(class_counts) if n <= novel_max]
    backbone = create_backbone(
        options.pop("backbone"),
        in_chans=in_chans,
        width=options.pop("width"),
        pretrained_path=options.pop("pretrained_path"),
    )
    return OLTRNetwork(backbone, num_classes, **options)


def load_stage1_into_stage2(
    stage2_net: OLTRNetwork, stage1_state_dict: Mapping[str, torch.Tensor]
) -> list[str]:
    """Initialise a stage-2 network from a stage-1 state dict (paper §3.3, original code).

    Copies every ``backbone.*`` and ``embed.*`` entry (all must be present with equal shapes);
    if ``stage2_net`` has a memory and stage 1 had a linear classifier (``classifier.bias``
    exists), T_hal is initialised from that classifier. Returns the state-dict names set.
    """
    target = stage2_net.state_dict()
    wanted = [k for k in target if k.startswith(("backbone.", "embed."))]
    missing = [k for k in wanted if k not in stage1_state_dict]
    if missing:
        raise InputError(
            f"stage-1 weights lack {len(missing)} backbone/embed entries (first: {missing[:5]})"
        )
    extra = [
        k for k in stage1_state_dict if k.startswith(("backbone.", "embed.")) and k not in target
    ]
    if extra:
        raise InputError(
            f"stage-1 weights have {len(extra)} backbone/embed entries the stage-2 network "
            f"lacks (first: {extra[:5]})"
        )
    for key in wanted:
        if tuple(stage1_state_dict[key].shape) != tuple(target[key].shape):
            raise InputError(
                f"stage-1 weight '{key}' has shape {tuple(stage1_state_dict[key].shape)}, "
                f"stage 2 expects {tuple(target[key].shape)}"
            )
    copied = {k: stage1_state_dict[k] for k in wanted}
    copied |= _classifier_from_stage1(stage2_net, stage1_state_dict, target)
    memory = stage2_net.meta_embedding
    if (
        memory is not None
        and memory.hallucinator is not None
        and "classifier.bias" in stage1_state_dict
    ):
        for name in ("weight", "bias"):
            source = stage1_state_dict[f"classifier.{name}"]
            key = f"meta_embedding.hallucinator.{name}"
            if tuple(source.shape) != tuple(target[key].shape):
                raise InputError(
                    f"stage-1 classifier.{name} has shape {tuple(source.shape)}, "
                    f"the hallucinator expects {tuple(target[key].shape)}"
                )
            copied[key] = source
    stage2_net.load_state_dict(copied, strict=False)
    return list(copied)


def _classifier_from_stage1(
    stage2_net: OLTRNetwork,
    stage1_state_dict: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The stage-1 linear classifier's entries a stage-2 head starts from: LWS wraps it
    (frozen, Kang et al. 2020); FSLwF starts its learned rows from its weight rows. Other
    heads (cRT's, OLTR's cosine classifier) start afresh."""
    classifier = stage2_net.classifier
    if isinstance(classifier, LearnableWeightScaling):
        names = {f"classifier.classifier.{n}": f"classifier.{n}" for n in ("weight", "bias")}
    elif isinstance(classifier, FSLwFClassifier):
        names = {"classifier.weight": "classifier.weight"}
    else:
        return {}
    copied = {}
    for key, source in names.items():
        if source not in stage1_state_dict:
            raise InputError(f"the {type(classifier).__name__} head starts from a stage-1 "
                             f"linear classifier, but the stage-1 weights lack '{source}'")
        if tuple(stage1_state_dict[source].shape) != tuple(target[key].shape):
            raise InputError(f"stage-1 {source} has shape "
                             f"{tuple(stage1_state_dict[source].shape)}, the stage-2 head "
                             f"expects {tuple(target[key].shape)}")
        copied[key] = stage1_state_dict[source]
    return copied


def freeze_backbone(net: OLTRNetwork, freeze_bn: bool = True) -> None:
    """Stop training the backbone: ``requires_grad=False`` on its parameters and, with
    ``freeze_bn``, its BatchNorm layers kept in eval mode (running statistics fixed) even
    after ``net.train()`` (the original code let them drift). Attention, embedding, memory
    and classifier stay trainable.
    """
    for parameter in net.backbone.parameters():
        parameter.requires_grad_(False)
    net.backbone_frozen = True
    net.backbone_bn_frozen = freeze_bn
    net.train(net.training)
