"""Batched image augmentation on uint8 tensors — the in-memory fast path of small datasets
(:class:`BatchAugment`) and the device path of JPEG datasets (:class:`DeviceImagenetTransform`)
— and the counter-based random numbers that make every augmentation a function of
``(seed, epoch, position)``. Both build from the preset definitions of
`oltr.data.transforms.PRESETS`, as the PIL pipeline does.

:class:`BatchAugment` does, for a whole batch at once and on the batch's device, what
``oltr.data.transforms.build_transform("small", train=True)`` does per PIL image after its
deterministic resize + centre crop: ``RandomCrop(size, padding=size // 8)`` (zero padding) and
``RandomHorizontalFlip``, then ``ToTensor`` (÷ 255) and ``Normalize``.

Its random numbers come from :func:`sample_uniform`, a counter-based generator (SplitMix64,
Steele et al. 2014): the draw of the image at *position* p of an epoch's global sample stream
depends on ``(seed, epoch, p)`` only — not on the batch it lands in, the number of DDP ranks,
the number of loader workers, or a resume. Same distributions as the PIL pipeline, not the same
random stream.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from oltr.data.transforms import PRESETS

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 counters (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def sample_uniform(seed: int, epoch: int, positions: Sequence[int] | np.ndarray,
                   stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per position: a pure function of ``(seed, epoch,
    position, stream)`` (``stream`` tells independent draws of one sample apart)."""
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch) ^ (np.uint64(stream) << np.uint64(40)))
    counters = np.asarray(positions, dtype=np.uint64)
    bits = _splitmix64(counters ^ key) >> np.uint64(11)  # 53 random bits
    return bits.astype(np.float64) / float(1 << 53)


def sample_seeds(seed: int, epoch: int, positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """One 63-bit integer seed per position (for per-image torch RNG seeding)."""
    key = _splitmix64(_splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    return (_splitmix64(np.asarray(positions, dtype=np.uint64) ^ key)
            >> np.uint64(1)).astype(np.int64)


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
                    ) -> torch.Tensor:
    """uint8 (B, C, H, W) → float32 ``(x / 255 − mean) / std`` per channel, exactly as
    torchvision's ``ToTensor`` + ``Normalize`` compute it, in the standard (NCHW) strides: a
    one-channel batch whose strides merely look channels-last would send convolutions down
    oneDNN's channels-last path (which crashes for narrow networks on AVX2 CPUs)."""
    floats = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    floats.copy_(images).div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return floats.sub_(mean_t).div_(std_t)


def random_crop(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor
                ) -> torch.Tensor:
    """Crop each sample of ``images`` (B, C, H, W) at its offsets ``top``/``left`` (B,) in
    ``0 … 2·padding`` after zero-padding ``padding`` pixels on every side: torchvision's
    ``RandomCrop(size, padding)`` with the offsets given."""
    if padding == 0:
        return images
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = top.to(images.device)[:, None] + torch.arange(height, device=images.device)
    cols = left.to(images.device)[:, None] + torch.arange(width, device=images.device)
    index = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # B,H,W,C
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip left-right the samples where ``flip`` (B,) is true."""
    return torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


class BatchAugment:
    """The training augmentation of a batchable ``preset`` (`oltr.data.transforms.Preset`:
    ``small``'s padded random crop and flip; ``none``'s nothing) on a uint8 batch, then
    normalisation.

    Call with the batch and the global stream positions of its images; ``train=False`` only
    normalises (the evaluation transform of already resized images). ValueError for a preset
    whose augmentation is not batchable (``imagenet``).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 train: bool = True, seed: int = 0, preset: str = "small") -> None:
        spec = PRESETS[preset]
        if not spec.batchable:
            raise ValueError(f"the {preset} preset's augmentation is not batchable")
        self.padding = spec.padding(image_size) if train else 0
        self.flip = train and spec.flip
        self.mean, self.std = list(mean), list(std)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draws(self, positions: Sequence[int] | np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The crop offsets (top, left) and flip flags of the images at ``positions``."""
        span = 2 * self.padding + 1
        top = np.floor(sample_uniform(self.seed, self.epoch, positions, 0) * span)
        left = np.floor(sample_uniform(self.seed, self.epoch, positions, 1) * span)
        flip = sample_uniform(self.seed, self.epoch, positions, 2) < 0.5
        return (torch.from_numpy(top.astype(np.int64)), torch.from_numpy(left.astype(np.int64)),
                torch.from_numpy(flip))

    def __call__(self, images: torch.Tensor, positions: Sequence[int] | np.ndarray | None = None
                 ) -> torch.Tensor:
        if self.padding or self.flip:
            if positions is None:
                raise ValueError("training augmentation needs the images' stream positions")
            top, left, flip = self.draws(positions)
            if self.padding:
                images = random_crop(images, self.padding, top, left)
            if self.flip:
                images = random_flip(images, flip)
        return normalize_uint8(images, self.mean, self.std)


# --------------------------------------------------------------------------- imagenet preset
_IMAGENET = PRESETS["imagenet"]
_CROP_ATTEMPTS = 10
#: Independent streams of :func:`sample_uniform` per image: 2 per crop attempt, then these.
_TOP, _LEFT, _FLIP, _BRIGHTNESS, _CONTRAST, _SATURATION, _ORDER = range(20, 27)
_ORDERS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def resized_crop_params(heights: np.ndarray, widths: np.ndarray, seed: int, epoch: int,
                        positions: Sequence[int] | np.ndarray,
                        scale: tuple[float, float] = _IMAGENET.crop_scale,
                        ratio: tuple[float, float] = _IMAGENET.crop_ratio
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``RandomResizedCrop.get_params`` (torchvision) for images of ``heights``/``widths``
    (B,) at stream ``positions``, vectorised, with :func:`sample_uniform` draws: up to 10
    attempts of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``,
    the first crop that fits wins; none → the central crop of the clamped aspect ratio.
    Returns ``(top, left, height, width)`` int64 (B,)."""
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    area = (heights * widths).astype(np.float64)
    log_ratio = np.log(ratio)
    found = np.zeros(len(heights), dtype=bool)
    crop_h, crop_w = heights.copy(), widths.copy()
    for attempt in range(_CROP_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0])
                         * sample_uniform(seed, epoch, positions, 2 * attempt))
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0])
                        * sample_uniform(seed, epoch, positions, 2 * attempt + 1))
        w = np.round(np.sqrt(target * aspect)).astype(np.int64)
        h = np.round(np.sqrt(target / aspect)).astype(np.int64)
        fits = ~found & (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
        crop_h[fits], crop_w[fits] = h[fits], w[fits]
        found |= fits
    # torchvision's fallback: the whole image, its aspect ratio clamped to ``ratio``
    in_ratio = widths / heights
    narrow, wide = ~found & (in_ratio < min(ratio)), ~found & (in_ratio > max(ratio))
    crop_h[narrow] = np.round(widths[narrow] / min(ratio)).astype(np.int64)
    crop_w[wide] = np.round(heights[wide] * max(ratio)).astype(np.int64)
    top = np.where(found, np.floor(sample_uniform(seed, epoch, positions, _TOP)
                                   * (heights - crop_h + 1)), (heights - crop_h) // 2)
    left = np.where(found, np.floor(sample_uniform(seed, epoch, positions, _LEFT)
                                    * (widths - crop_w + 1)), (widths - crop_w) // 2)
    return top.astype(np.int64), left.astype(np.int64), crop_h, crop_w


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` of float (B, 3, H, W) → (B, 1, H, W); grey input
    as it is."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` (brightness, contrast, saturation; no hue) on a float batch
    (B, C, H, W) in [0, 1], per sample: factors (B,) and the order (B, 3) in which the three
    adjustments (0 brightness, 1 contrast, 2 saturation) apply, each one
    ``(f·x + (1 − f)·reference).clamp(0, 1)`` with reference 0, the mean grey value, the grey
    image (``torchvision.transforms.functional.adjust_*`` on tensors).

    Each step computes one blend per sample, its factor and reference picked per sample
    (reference ``1{contrast}·mean + 1{saturation}·grey``: exactly 0, the mean or the grey
    image), not all three adjustments; the values equal the three-way form bit for bit."""
    shape = (-1, 1, 1, 1)
    factors = torch.stack([brightness, contrast, saturation], dim=1).to(x)  # (B, 3)
    order = order.to(x.device)
    for step in range(3):
        op = order[:, step]
        f = factors.gather(1, op.view(-1, 1)).view(shape)
        grey = _grey(x)
        is_contrast = (op == 1).to(x.dtype).view(shape)
        is_saturation = (op == 2).to(x.dtype).view(shape)
        reference = is_contrast * grey.mean(dim=(1, 2, 3), keepdim=True) + is_saturation * grey
        x = (f * x + (1 - f) * reference).clamp(0, 1)
    return x


class DeviceImagenetTransform:
    """The ``imagenet`` preset (`oltr.data.transforms.PRESETS`) on decoded uint8 images
    (C, H, W) of any sizes, on their device, for a whole batch (``data.decode: device``):

    - ``train=True``: RandomResizedCrop(``image_size``) + RandomHorizontalFlip +
      ColorJitter(0.4, 0.4, 0.4; saturation only with 3 channels), then normalisation; every
      draw from :func:`sample_uniform` at the image's stream position, so a sample's
      augmentation is a function of ``(seed, epoch, position)`` only, as the other loaders';
    - ``train=False``: Resize(round(image_size·256/224)) + CenterCrop(image_size), then
      normalisation.

    Resizing is torchvision's (``transforms.v2.functional``, bilinear, antialiased) per image;
    flip, jitter and normalisation act on the stacked batch. Same distributions as the PIL
    pipeline, not its random stream; the eval output matches the PIL transform within the
    tolerance stated in docs/speed.md.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 train: bool, seed: int = 0) -> None:
        self.image_size, self.train, self.seed = image_size, train, seed
        self.resize_to = _IMAGENET.resize_to(image_size)
        self.mean, self.std = list(mean), list(std)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, images: Sequence[torch.Tensor],
                 positions: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        size = self.image_size
        if not self.train:
            batch = torch.stack([TF.center_crop(TF.resize(image, [self.resize_to], antialias=True),
                                                [size]) for image in images])
            return normalize_uint8(batch, self.mean, self.std)
        if positions is None:
            raise ValueError("training augmentation needs the images' stream positions")
        seed, epoch = self.seed, self.epoch
        top, left, height, width = resized_crop_params(
            np.array([image.shape[1] for image in images]),
            np.array([image.shape[2] for image in images]), seed, epoch, positions,
            _IMAGENET.crop_scale, _IMAGENET.crop_ratio)
        batch = torch.stack([
            TF.resized_crop(image, int(t), int(lf), int(h), int(w), [size, size], antialias=True)
            for image, t, lf, h, w in zip(images, top, left, height, width)])
        batch = random_flip(batch, torch.from_numpy(
            sample_uniform(seed, epoch, positions, _FLIP) < 0.5))
        x = batch.float().div_(255.0)

        def factor(stream: int) -> torch.Tensor:
            jitter = _IMAGENET.jitter
            return torch.from_numpy(1 - jitter + 2 * jitter
                                    * sample_uniform(seed, epoch, positions, stream))

        saturation = factor(_SATURATION) if x.shape[1] == 3 else torch.ones(len(images),
                                                                             dtype=torch.float64)
        order = _ORDERS[torch.from_numpy(np.floor(
            sample_uniform(seed, epoch, positions, _ORDER) * 6).astype(np.int64))]
        x = color_jitter(x, factor(_BRIGHTNESS), factor(_CONTRAST), saturation, order)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)
