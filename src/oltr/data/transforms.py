"""Image transform presets (PIL image in, normalised tensor out)."""
from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

TRANSFORM_PRESETS = ("small", "imagenet", "none")


def build_transform(
    preset: str,
    *,
    train: bool,
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    output: str = "normalized",
) -> T.Compose:
    """The ``preset`` pipeline for training (``train=True``) or evaluation, then ToTensor/Normalize.

    ``output="uint8"`` ends with ``PILToTensor`` instead (uint8 (C, H, W), 4× fewer bytes to
    pass between processes and to the device); `oltr.train.augment.normalize_uint8` then
    computes exactly what ToTensor + Normalize would (the file loader normalises on the
    training device, `oltr.train.loaders.DevicePrefetcher`).

    - ``"small"`` (28-64 px images): Resize + CenterCrop to ``image_size``; for training then
      RandomCrop(image_size, padding=image_size // 8) and RandomHorizontalFlip.
    - ``"imagenet"`` (paper appendix D.2, 224 px): train = RandomResizedCrop(image_size) +
      RandomHorizontalFlip + ColorJitter(0.4, 0.4, 0.4) (saturation only for 3 channels);
      eval = Resize(image_size * 256 / 224) + CenterCrop(image_size).
    - ``"none"``: no resizing or augmentation.

    ``channels`` is the number of channels of the input images (1 for mode "L", 3 for "RGB");
    ``mean`` and ``std`` give one value per channel.
    """
    if preset not in TRANSFORM_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(TRANSFORM_PRESETS)}, got {preset!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} values each, got mean={list(mean)}, std={list(std)}"
        )
    if any(value <= 0 for value in std):
        raise ValueError(f"std values must be > 0, got {list(std)}")
    if output not in ("normalized", "uint8"):
        raise ValueError(f"output must be normalized or uint8, got {output!r}")

    steps: list[object] = []
    if preset == "small":
        steps += [T.Resize(image_size), T.CenterCrop(image_size)]
        if train:
            steps += [
                T.RandomCrop(image_size, padding=image_size // 8),
                T.RandomHorizontalFlip(),
            ]
    elif preset == "imagenet":
        if train:
            steps += [
                T.RandomResizedCrop(image_size),
                T.RandomHorizontalFlip(),
                T.ColorJitter(0.4, 0.4, 0.4 if channels == 3 else 0.0),
            ]
        else:
            steps += [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    if output == "uint8":
        steps += [T.PILToTensor()]
    else:
        steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)
