from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oltr.errors import InputError
from oltr.losses import LargeMarginCentroidLoss
from oltr.models import (
    NETWORK_DEFAULTS,
    CosineClassifier,
    LinearClassifier,
    OLTRNetwork,
    class_means,
    create_network,
    freeze_backbone,
    load_stage1_into_stage2,
)

SMALL = {"backbone": "resnet10_small", "width": 8}  # 64-d features, 16 px inputs → 2×2 maps
FULL = {
    **SMALL,
    "classifier": "cosine",
    "attention": True,
    "meta_embedding": True,
}


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _init_memory(net: OLTRNetwork, images: torch.Tensor, labels: torch.Tensor) -> None:
    with torch.no_grad():
        features = net.pool(net.forward_features(images))
    net.meta_embedding.init_centroids(class_means(features, labels, net.num_classes))


def test_plain_network_outputs():
    torch.manual_seed(0)
    net = create_network(SMALL, num_classes=5, in_chans=1)
    assert isinstance(net.classifier, LinearClassifier)
    assert net.attention is None and net.meta_embedding is None and net.embed is None
    out = net(_images())
    assert out.logits.shape == (8, 5) and out.features.shape == (8, 64)
    assert out.meta is None and out.reachability is None


def test_full_network_is_the_composition_of_its_parts():
    torch.manual_seed(0)
    net = create_network({**FULL, "embed_dim": 32}, num_classes=4, in_chans=1).eval()
    images, labels = _images(), torch.arange(8) % 4
    _init_memory(net, images, labels)
    out = net(images)
    fmap = net.forward_features(images)
    assert fmap.shape == (8, 64, 2, 2)
    v_direct = net.pool(fmap)
    torch.testing.assert_close(out.features, v_direct)
    torch.testing.assert_close(v_direct, F.relu(net.embed[0](fmap.mean(dim=(2, 3)))))
    memory = net.meta_embedding(v_direct)
    torch.testing.assert_close(out.meta, memory["meta"])
    torch.testing.assert_close(out.reachability, memory["reachability"])
    torch.testing.assert_close(out.logits, net.classifier(memory["meta"]))
    assert isinstance(net.classifier, CosineClassifier) and net.feature_dim == 32


def test_create_network_validates_keys_and_values():
    with pytest.raises(InputError, match="unknown model config keys: attn, depth"):
        create_network({"attn": True, "depth": 3}, 3, 1)
    with pytest.raises(InputError, match="classifier"):
        create_network({**SMALL, "classifier": "svm"}, 3, 1)
    with pytest.raises(InputError, match="dropout"):
        create_network({**SMALL, "dropout": 1.0}, 3, 1)
    with pytest.raises(ValueError, match="resnet10_small"):
        create_network({"backbone": "vgg"}, 3, 1)
    assert set(NETWORK_DEFAULTS) >= {
        "backbone", "width", "pretrained_path", "classifier", "cosine_scale", "squash_form",
        "attention", "modulation", "meta_embedding", "use_memory", "use_selector",
        "use_reachability", "reachability_scale", "embed_dim", "dropout",
    }


def test_switches_reach_the_modules():
    net = create_network(
        {**FULL, "modulation": False, "use_selector": False, "cosine_scale": 8.0,
         "squash_form": "original", "reachability_scale": 3.0},
        num_classes=3, in_chans=1,
    )
    assert net.attention.modulation is None
    assert net.meta_embedding.selector is None
    assert net.meta_embedding.reachability_scale.item() == 3.0
    assert net.classifier.scale.item() == 8.0 and net.classifier.squash_form == "original"


def test_dropout_acts_on_the_classifier_input_only():
    torch.manual_seed(0)
    net = create_network({**SMALL, "dropout": 0.5}, num_classes=3, in_chans=1).train()
    images = _images()
    first, second = net(images), net(images)
    torch.testing.assert_close(first.features, second.features)
    assert not torch.allclose(first.logits, second.logits)


def test_gradients_reach_every_learnable_part():
    torch.manual_seed(0)
    net = create_network(FULL, num_classes=4, in_chans=1)
    images, labels = _images(), torch.arange(8) % 4
    _init_memory(net, images, labels)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    centroid_loss = LargeMarginCentroidLoss(margin=100.0)  # active, so it reaches the centroids

    def step() -> None:
        optimizer.zero_grad()
        out = net(images)
        loss = F.cross_entropy(out.logits, labels)
        loss = loss + 0.1 * centroid_loss(out.features, labels, net.meta_embedding.centroids)
        loss.backward()

    step()
    optimizer.step()  # leave the attention's zero init
    step()
    parts = [
        "backbone.conv1.weight", "backbone.layer4.0.conv2.weight",
        "attention.self_attention.theta.weight", "attention.self_attention.phi.weight",
        "attention.self_attention.g.weight", "attention.self_attention.out.weight",
        "attention.modulation.query.weight", "attention.modulation.key.weight",
        "meta_embedding.hallucinator.weight", "meta_embedding.selector.weight",
        "meta_embedding.centroids", "classifier.weight",
    ]
    for name in parts:
        grad = net.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def _bn_stats(net: OLTRNetwork) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.backbone.state_dict().items() if "running" in k}


def test_frozen_backbone_keeps_bn_statistics_while_the_head_learns():
    torch.manual_seed(0)
    net = create_network({**SMALL, "attention": True}, num_classes=3, in_chans=1)
    torch.nn.init.normal_(net.attention.self_attention.out.weight, std=0.1)
    freeze_backbone(net)
    net.train()
    assert net.training and not net.backbone.bn1.training and net.attention.training
    assert all(not p.requires_grad for p in net.backbone.parameters())
    stats, weights = _bn_stats(net), {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(net(_images()).logits, torch.arange(8) % 3)
    loss.backward()
    optimizer.step()
    for key, value in _bn_stats(net).items():
        assert torch.equal(value, stats[key]), key
    after = net.state_dict()
    assert torch.equal(after["backbone.conv1.weight"], weights["backbone.conv1.weight"])
    assert not torch.equal(after["classifier.weight"], weights["classifier.weight"])
    theta = "attention.self_attention.theta.weight"
    assert not torch.equal(after[theta], weights[theta])


def test_frozen_backbone_without_freeze_bn_updates_statistics():
    net = create_network(SMALL, num_classes=3, in_chans=1)
    freeze_backbone(net, freeze_bn=False)
    stats = _bn_stats(net)
    net.train()(_images())
    assert not torch.equal(_bn_stats(net)["bn1.running_mean"], stats["bn1.running_mean"])


def test_load_stage1_into_stage2():
    torch.manual_seed(0)
    stage1 = create_network({**SMALL, "embed_dim": 16}, num_classes=4, in_chans=1)
    stage2 = create_network({**FULL, "embed_dim": 16}, num_classes=4, in_chans=1)
    names = load_stage1_into_stage2(stage2, stage1.state_dict())
    assert "backbone.conv1.weight" in names and "embed.0.weight" in names
    assert "backbone.bn1.running_mean" in names
    assert names[-2:] == ["meta_embedding.hallucinator.weight", "meta_embedding.hallucinator.bias"]
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    for key in [k for k in s1 if k.startswith(("backbone.", "embed."))]:
        assert torch.equal(s1[key], s2[key]), key
    assert torch.equal(s2["meta_embedding.hallucinator.weight"], s1["classifier.weight"])
    assert torch.equal(s2["meta_embedding.hallucinator.bias"], s1["classifier.bias"])
    assert not stage2.meta_embedding.initialized  # centroids come later, from stage-2 features


def test_load_stage1_skips_the_hallucinator_after_a_cosine_stage1():
    stage1 = create_network({**SMALL, "classifier": "cosine"}, num_classes=4, in_chans=1)
    stage2 = create_network(FULL, num_classes=4, in_chans=1)
    names = load_stage1_into_stage2(stage2, stage1.state_dict())
    assert all(name.startswith("backbone.") for name in names)


def test_load_stage1_rejects_a_different_backbone():
    stage1 = create_network({**SMALL, "width": 4}, num_classes=4, in_chans=1)
    stage2 = create_network(FULL, num_classes=4, in_chans=1)
    with pytest.raises(InputError, match="backbone.conv1.weight.*shape"):
        load_stage1_into_stage2(stage2, stage1.state_dict())
    state = create_network(SMALL, num_classes=4, in_chans=1).state_dict()
    del state["backbone.layer1.0.bn1.weight"]
    with pytest.raises(InputError, match="lack 1 .*layer1.0.bn1.weight"):
        load_stage1_into_stage2(stage2, state)


def test_narrow_networks_keep_the_default_memory_format() -> None:
    """A 1×1 stride-2 convolution with 2–7 input channels corrupts the heap in its
    channels-last backward pass (oneDNN, torch 2.14.1 on AVX2-only CPUs): such networks
    train in the default format."""
    from oltr.models import create_network

    narrow = create_network({"backbone": "resnet10_small", "width": 4}, 4, 1)
    assert not narrow.supports_channels_last
    assert create_network({"backbone": "resnet10_small", "width": 8}, 4, 1).supports_channels_last
