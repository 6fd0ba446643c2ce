"""ResNet backbones built from torchvision's residual blocks, and a timm-style registry.

A backbone maps images (B, C, H, W) to the last feature map (B, ``feature_dim``, h, w) through
``forward_features``; pooling belongs to the network (``oltr.models.network``). Module names
follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` … ``layer4``), so a torchvision
state dict (minus its ``fc.*`` classifier) loads as is.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from oltr.errors import InputError

Block = type[BasicBlock] | type[Bottleneck]
STEMS = ("imagenet", "small")


class ResNetBackbone(nn.Module):
    """ResNet feature extractor (He et al. 2016) with an ImageNet or a small-image stem.

    ``stem="imagenet"``: 7×7 stride-2 conv + BN + ReLU + 3×3 stride-2 max-pool (the paper's
    224 px setting). ``stem="small"``: 3×3 stride-1 conv + BN + ReLU, no pool (28–64 px inputs).
    Stages have widths ``width·(1, 2, 4, 8)`` (× the block's expansion) and strides 1, 2, 2, 2.
    Convolutions use Kaiming-normal init; ``zero_init_residual`` zeroes the last BN of every
    block so each residual branch starts at zero (Goyal et al. 2017).
    """

    def __init__(
        self,
        block: Block,
        layers: list[int] | tuple[int, ...],
        *,
        in_chans: int = 3,
        width: int = 64,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise InputError(f"unknown ResNet stem (valid: {', '.join(STEMS)})", value=stem)
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise InputError("a ResNet needs four stages of at least one block", value=layers)
        if width < 1 or in_chans < 1:
            raise InputError("width and in_chans must be positive", value=(width, in_chans))
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = width
        self.layer1 = self._make_stage(block, width, layers[0], stride=1)
        self.layer2 = self._make_stage(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_stage(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_stage(block, width * 8, layers[3], stride=2)
        self.feature_dim = width * 8 * block.expansion
        self._init_weights(zero_init_residual)

    def _make_stage(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        stage += [block(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


_BACKBONES: dict[str, Callable[..., ResNetBackbone]] = {}


def register_backbone(fn: Callable[..., ResNetBackbone]) -> Callable[..., ResNetBackbone]:
    """Decorator: register ``fn(**kwargs) -> backbone`` under its function name."""
    if fn.__name__ in _BACKBONES:
        raise ValueError(f"backbone '{fn.__name__}' is already registered")
    _BACKBONES[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


@register_backbone
def resnet10(**kwargs) -> ResNetBackbone:
    """ResNet-10: BasicBlock × [1, 1, 1, 1], 512-d, ImageNet stem (the paper's ImageNet-LT)."""
    return ResNetBackbone(BasicBlock, [1, 1, 1, 1], **{"stem": "imagenet", **kwargs})


@register_backbone
def resnet10_small(**kwargs) -> ResNetBackbone:
    """ResNet-10 with the small-image stem (28–64 px); 8·width-d (width 32 → 256-d)."""
    return ResNetBackbone(BasicBlock, [1, 1, 1, 1], **{"stem": "small", **kwargs})


@register_backbone
def resnet18(**kwargs) -> ResNetBackbone:
    """ResNet-18: BasicBlock × [2, 2, 2, 2], 512-d."""
    return ResNetBackbone(BasicBlock, [2, 2, 2, 2], **{"stem": "imagenet", **kwargs})


@register_backbone
def resnet50(**kwargs) -> ResNetBackbone:
    """ResNet-50: Bottleneck × [3, 4, 6, 3], 2048-d."""
    return ResNetBackbone(Bottleneck, [3, 4, 6, 3], **{"stem": "imagenet", **kwargs})


@register_backbone
def resnet152(**kwargs) -> ResNetBackbone:
    """ResNet-152: Bottleneck × [3, 8, 36, 3], 2048-d (Places-LT, ImageNet-pretrained)."""
    return ResNetBackbone(Bottleneck, [3, 8, 36, 3], **{"stem": "imagenet", **kwargs})


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    width: int | None = None,
    pretrained_path: str | PathLike[str] | None = None,
    **kwargs,
) -> ResNetBackbone:
    """Build a registered backbone; ``width=None`` keeps its default (64).

    ``pretrained_path`` loads a local torchvision ResNet state dict (never downloaded); its
    ``fc.*`` entries are ignored.
    """
    if name not in _BACKBONES:
        raise InputError(f"unknown backbone (valid: {', '.join(list_backbones())})", value=name)
    if width is not None:
        kwargs["width"] = width
    backbone = _BACKBONES[name](in_chans=in_chans, **kwargs)
    if pretrained_path is not None:
        load_pretrained(backbone, pretrained_path)
    return backbone


#: Keys under which training scripts commonly nest a state dict in a checkpoint file.
CHECKPOINT_KEYS = ("state_dict", "model")


def _unwrap_state(state: object) -> object:
    """A checkpoint's state dict: the mapping itself, or the one under ``state_dict`` /
    ``model`` (a training script's checkpoint), with a ``module.`` prefix on every key (a
    ``DataParallel`` model's) removed."""
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in CHECKPOINT_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if isinstance(state, Mapping) and state and all(
            isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


#: torchvision's ResNets by (blocks per stage, block kind).
_RESNET_NAMES = {((2, 2, 2, 2), "basic"): "resnet18", ((3, 4, 6, 3), "basic"): "resnet34",
                 ((3, 4, 6, 3), "bottleneck"): "resnet50",
                 ((3, 4, 23, 3), "bottleneck"): "resnet101",
                 ((3, 8, 36, 3), "bottleneck"): "resnet152"}


def _resnet_layout(state: Mapping[str, Any]) -> tuple[tuple[int, ...], str]:
    """(blocks in layer1..layer4, ``basic`` or ``bottleneck``) read off a ResNet state dict's
    key names (``layer3.35.conv3.weight``); ``()`` when it has no such keys."""
    blocks = [0, 0, 0, 0]
    bottleneck = False
    for key in state:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] in ("layer1", "layer2", "layer3", "layer4") and (
                parts[1].isdigit()):
            stage = int(parts[0][-1]) - 1
            blocks[stage] = max(blocks[stage], int(parts[1]) + 1)
            bottleneck |= parts[2] == "conv3"
    return (tuple(blocks) if any(blocks) else ()), ("bottleneck" if bottleneck else "basic")


def _layout_text(layout: tuple[tuple[int, ...], str]) -> str:
    blocks, kind = layout
    name = _RESNET_NAMES.get(layout)
    text = f"{', '.join(map(str, blocks))} {kind} blocks per stage"
    return f"{text} ({name})" if name else text


def load_pretrained(backbone: nn.Module, path: str | PathLike[str]) -> None:
    """Load a torchvision-style state dict file into ``backbone`` (``fc.*`` keys dropped).

    The file is read with ``torch.load(weights_only=True)``: a state dict (torchvision's
    ``model.state_dict()``, e.g. ResNet-152 IMAGENET1K_V1 saved once), or a checkpoint holding
    one under ``state_dict`` or ``model``; a ``module.`` prefix (``DataParallel``) is removed.
    Every backbone key must be present with the same shape, and no other key may remain: a
    converted model (e.g. from Caffe) must use torchvision's key names. Nothing is downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("pretrained weights file not found", path=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-tensor files
        if "Weights only load failed" in str(exc):  # a pickled object, e.g. a whole model
            raise InputError(
                "the file holds a pickled Python object (e.g. a whole model saved with "
                "torch.save(model)), which oltr does not unpickle (it could run any code): "
                "save the model's state dict instead, torch.save(model.state_dict(), PATH)",
                path=path) from None
        raise InputError(f"cannot read pretrained weights: {exc}", path=path) from exc
    state = _unwrap_state(state)
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InputError("pretrained weights must be a state dict of tensors", path=path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        found, wanted = _resnet_layout(state), _resnet_layout(expected)
        layouts = ""
        if found != wanted and found[0]:
            layouts = (f"; the file's ResNet has {_layout_text(found)}, this backbone "
                       f"{_layout_text(wanted)} (model.backbone)")
        raise InputError(
            f"pretrained weights do not match the backbone: {len(missing)} missing keys "
            f"(first: {missing[:5]}), {len(unexpected)} unexpected keys (first: "
            f"{unexpected[:5]}){layouts}", path=path,
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise InputError(
                f"pretrained weight '{key}' has shape {tuple(state[key].shape)}, "
                f"the backbone expects {tuple(tensor.shape)}",
                path=path,
            )
    backbone.load_state_dict(state)
