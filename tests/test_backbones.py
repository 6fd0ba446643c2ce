from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from oltr.errors import InputError
from oltr.models.backbones import (
    ResNetBackbone,
    create_backbone,
    list_backbones,
    register_backbone,
)


def test_registry_lists_the_paper_backbones():
    assert {"resnet10", "resnet10_small", "resnet18", "resnet50", "resnet152"} <= set(
        list_backbones()
    )


def test_unknown_backbone_names_the_valid_ones():
    with pytest.raises(ValueError, match="resnet10_small"):
        create_backbone("resnet11")


def test_duplicate_registration_is_an_error():
    def resnet10(**kwargs):
        return ResNetBackbone(BasicBlock, [1, 1, 1, 1], **kwargs)

    with pytest.raises(ValueError, match="already registered"):
        register_backbone(resnet10)
    assert list_backbones().count("resnet10") == 1


def test_resnet10_imagenet_stem_shapes():
    net = create_backbone("resnet10")
    assert net.feature_dim == 512
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 4
    fmap = net.forward_features(torch.randn(2, 3, 64, 64))
    assert fmap.shape == (2, 512, 2, 2)  # stride 32


def test_resnet10_small_stem_keeps_resolution_for_small_images():
    net = create_backbone("resnet10_small", in_chans=1, width=32)
    assert net.feature_dim == 256
    assert isinstance(net.maxpool, torch.nn.Identity) and net.conv1.kernel_size == (3, 3)
    assert net.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 256, 4, 4)  # stride 8


def test_bottleneck_backbones_are_2048_d():
    net = create_backbone("resnet152")
    assert net.feature_dim == 2048
    assert sum(isinstance(m, Bottleneck) for m in net.modules()) == 3 + 8 + 36 + 3
    assert create_backbone("resnet50", width=16).feature_dim == 16 * 8 * 4


def test_matches_torchvision_resnet18_with_its_weights(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # includes fc.*, which must be ignored
    ours = create_backbone("resnet18", pretrained_path=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(reference.children())[:-2])(x)
        torch.testing.assert_close(ours.forward_features(x), expected)


def test_mismatched_pretrained_keys_name_the_file_and_keys(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(InputError, match=r"r18\.pth.*unexpected keys.*layer1\.1\.conv1\.weight.*"
                                         r"the file's ResNet has 2, 2, 2, 2 basic blocks per "
                                         r"stage \(resnet18\), this backbone 1, 1, 1, 1 basic"):
        create_backbone("resnet10", pretrained_path=path)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(InputError, match=r"3, 4, 6, 3 bottleneck blocks per stage \(resnet50\), "
                                         r"this backbone 2, 2, 2, 2 basic blocks per stage "
                                         r"\(resnet18\)"):
        create_backbone("resnet18", pretrained_path=path)
    torch.save(torchvision.models.resnet18(weights=None), path)  # a whole pickled model
    with pytest.raises(InputError, match=r"r18\.pth: the file holds a pickled Python object.*"
                                         r"torch\.save\(model\.state_dict\(\), PATH\)") as error:
        create_backbone("resnet18", pretrained_path=path)
    assert "\n" not in str(error.value) and "\x1b" not in str(error.value)
    state = create_backbone("resnet10").state_dict()
    del state["bn1.weight"]
    torch.save(state, path)
    with pytest.raises(InputError, match=r"1 missing keys.*bn1\.weight"):
        create_backbone("resnet10", pretrained_path=path)


def test_mismatched_pretrained_shapes_and_missing_file(tmp_path):
    path = tmp_path / "narrow.pth"
    torch.save(create_backbone("resnet10", width=32).state_dict(), path)
    with pytest.raises(InputError, match="conv1.weight.*shape"):
        create_backbone("resnet10", pretrained_path=path)
    with pytest.raises(InputError, match="not found"):
        create_backbone("resnet10", pretrained_path=tmp_path / "absent.pth")


def test_init_kaiming_and_optional_zero_residual():
    torch.manual_seed(0)
    net = create_backbone("resnet10")
    conv = net.layer3[0].conv1  # fan_out = 256 · 3 · 3
    expected_std = (2.0 / (256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    assert all(m.bn2.weight.abs().min() == 1 for m in net.modules() if isinstance(m, BasicBlock))
    zeroed = create_backbone("resnet10", zero_init_residual=True)
    blocks = [m for m in zeroed.modules() if isinstance(m, BasicBlock)]
    assert all(b.bn2.weight.abs().max() == 0 for b in blocks)
    bottlenecks = ResNetBackbone(Bottleneck, [1, 1, 1, 1], width=8, zero_init_residual=True)
    assert all(
        m.bn3.weight.abs().max() == 0 for m in bottlenecks.modules() if isinstance(m, Bottleneck)
    )


def test_bad_arguments():
    with pytest.raises(InputError, match="stem"):
        ResNetBackbone(BasicBlock, [1, 1, 1, 1], stem="cifar")
    with pytest.raises(InputError, match="four stages"):
        ResNetBackbone(BasicBlock, [1, 1, 1])
