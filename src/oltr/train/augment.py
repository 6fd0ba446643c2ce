"""Batched image augmentation on uint8 tensors (the in-memory fast path of small datasets), and
the counter-based random numbers that make every augmentation a function of
``(seed, epoch, position)``.

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
    """The ``small`` preset's training augmentation on a uint8 batch, then normalisation.

    Call with the batch and the global stream positions of its images; ``train=False`` only
    normalises (the evaluation transform of already resized images).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 train: bool = True, seed: int = 0) -> None:
        self.padding = image_size // 8 if train else 0
        self.flip = train
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
