"""Model components of OLTR: backbones, modulated attention, memory, classifiers (incl. the
CosFace / ArcFace face head), the network."""
from oltr.models.attention import ModulatedAttention, ModulationMap, SelfAttention
from oltr.models.backbones import (
    ResNetBackbone,
    create_backbone,
    list_backbones,
    load_pretrained,
    register_backbone,
)
from oltr.models.classifiers import (
    CosineClassifier,
    FSLwFClassifier,
    LearnableWeightScaling,
    LinearClassifier,
    squash,
)
from oltr.models.margin import MarginClassifier, MarginSoftmaxLoss
from oltr.models.memory import MetaEmbedding, class_means, reachability
from oltr.models.network import (
    NETWORK_DEFAULTS,
    NetworkOutput,
    OLTRNetwork,
    create_network,
    freeze_backbone,
    load_stage1_into_stage2,
)

__all__ = [
    "NETWORK_DEFAULTS",
    "CosineClassifier",
    "FSLwFClassifier",
    "LearnableWeightScaling",
    "LinearClassifier",
    "MarginClassifier",
    "MarginSoftmaxLoss",
    "MetaEmbedding",
    "ModulatedAttention",
    "ModulationMap",
    "NetworkOutput",
    "OLTRNetwork",
    "ResNetBackbone",
    "SelfAttention",
    "class_means",
    "create_backbone",
    "create_network",
    "freeze_backbone",
    "list_backbones",
    "load_pretrained",
    "load_stage1_into_stage2",
    "reachability",
    "register_backbone",
    "squash",
]
