"""Image transform presets: one definition per ``data.transform`` preset (:data:`PRESETS`),
which every image path builds from — the PIL pipeline here (:func:`build_transform`, PIL image
in, normalised tensor out), the in-memory uint8 path (`oltr.data.tensors.TensorImages` +
`oltr.data.augment.BatchAugment`) and the device path (`oltr.data.jpeg` +
`oltr.data.augment.DeviceImagenetTransform`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torchvision import transforms as T

from oltr.registry import Registry


@dataclass(frozen=True)
class Preset:
    """The operations of one ``data.transform`` preset, for ``image_size`` px outputs.

    - evaluation: Resize(round(image_size · ``resize``)) + CenterCrop(image_size); ``resize``
      None keeps the pixels as they are (no resizing, no augmentation);
    - training: RandomResizedCrop(image_size, ``crop_scale``, ``crop_ratio``) when
      ``random_resized_crop``, else the evaluation resize + crop followed by
      RandomCrop(image_size, padding=image_size // ``pad_divisor``) when ``pad_divisor``; then
      RandomHorizontalFlip when ``flip``; then ColorJitter(``jitter``, ``jitter``, ``jitter``;
      saturation only for 3 channels) when ``jitter``.

    Mean and std are not a preset's: they are the benchmark's (``data.mean``/``data.std``).
    """

    name: str
    resize: float | None = None
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    pad_divisor: int = 0
    flip: bool = False
    jitter: float = 0.0

    def resize_to(self, image_size: int) -> int:
        """The evaluation resize's target (shorter side) for ``image_size`` px outputs;
        ValueError for a preset that does not resize."""
        if self.resize is None:
            raise ValueError(f"the {self.name} preset does not resize")
        return round(image_size * self.resize)

    def padding(self, image_size: int) -> int:
        """The training RandomCrop's zero padding (0: no random crop)."""
        return image_size // self.pad_divisor if self.pad_divisor else 0

    @property
    def batchable(self) -> bool:
        """Whether everything but a padded random crop and a flip is deterministic, so a split
        can be resized once and augmented as a uint8 batch (`oltr.data.tensors`)."""
        return not self.random_resized_crop and not self.jitter

    def fixed_steps(self, image_size: int) -> list[object]:
        """The deterministic resize + centre crop (PIL or tensor images), or nothing."""
        if self.resize is None:
            return []
        return [T.Resize(self.resize_to(image_size)), T.CenterCrop(image_size)]


#: ``small`` (28-64 px images), ``imagenet`` (paper appendix D.2, 224 px), ``none`` (no
#: resizing or augmentation).
#: A preset of one's own: ``PRESETS.register(Preset("name", …))``; ``data.transform`` then
#: accepts it (the config reads this registry).
PRESETS: Registry[Preset] = Registry("transform preset", name_attribute="name")
PRESETS.register(None, Preset("small", resize=1.0, pad_divisor=8, flip=True))
PRESETS.register(None, Preset("imagenet", resize=256 / 224, random_resized_crop=True, flip=True,
                              jitter=0.4))
PRESETS.register(None, Preset("none"))
TRANSFORM_PRESETS = tuple(PRESETS)


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
    pass between processes and to the device); `oltr.data.augment.normalize_uint8` then
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
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
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

    spec = PRESETS[preset]
    steps: list[object] = []
    if train and spec.random_resized_crop:
        steps += [T.RandomResizedCrop(image_size, scale=spec.crop_scale, ratio=spec.crop_ratio)]
    else:
        steps += spec.fixed_steps(image_size)
    if train:
        if spec.pad_divisor:
            steps += [T.RandomCrop(image_size, padding=spec.padding(image_size))]
        if spec.flip:
            steps += [T.RandomHorizontalFlip()]
        if spec.jitter:
            steps += [T.ColorJitter(spec.jitter, spec.jitter,
                                    spec.jitter if channels == 3 else 0.0)]
    if output == "uint8":
        steps += [T.PILToTensor()]
    else:
        steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)
