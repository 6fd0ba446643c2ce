"""JPEG files decoded as a batch on the training device (``data.decode: device``).

DataLoader workers only read each file's bytes (:class:`EncodedImages`); the main process
decodes a batch at once with ``torchvision.io.decode_jpeg(list_of_bytes, device=…)`` (nvJPEG
on CUDA, libjpeg-turbo on the CPU) — :func:`decode_images` — and the batch is then resized,
augmented and normalised on the device (`oltr.data.augment.DeviceImagenetTransform`).

Which files are decoded where (decided here, documented in docs/speed.md):

- **JPEG streams torchvision decodes** — 8-bit, Huffman-coded baseline, extended or progressive
  (SOF0/1/2) with 1 (grey) or 3 (YCbCr/RGB) components, sniffed from the header by
  :func:`device_decodable` — go to the device as bytes.
- **every other file** (PNG, a PNG named ``.JPEG`` — ImageNet has one —, CMYK/YCCK JPEGs —
  ImageNet has 22 —, 12-bit, arithmetic-coded or lossless JPEGs, BMP, …) is **decoded by
  Pillow in the worker** with the one image loader (`oltr.data.images.load_image`: the same
  mode rules as everywhere else) and travels as a uint8 tensor: a dataset with a few such
  files works, at the CPU's speed for those files only. Refusing them would stop ImageNet-LT.
- a JPEG that ``decode_jpeg`` rejects after all (corrupt data its header did not show) is
  retried alone, then read by Pillow in the main process; if Pillow fails too, its error names
  the split file, line and image, as every other unreadable image does.

**Stream safety on CUDA.** nvJPEG's hardware decoder does not honour the stream it is given:
with work still queued on that stream it can write its output into memory the caching
allocator just handed back — blocks that queued kernels still read — and the caller sees wrong
numbers or NaNs far from the decoder (meta-pytorch/torchcodec#1634, pytorch/vision#9606). Seen
here: ``oltr train`` with ``data.decode: device`` on an H200 (torchvision 0.26) stopped with a
NaN loss within an epoch. So :func:`_decode_jpeg` decodes on a side stream of its own that
holds no queued work when the decoder starts (synchronised first), so the decoder only gets
blocks of that stream; the compute stream waits for the side stream, and the outputs are
recorded on the compute stream, so their blocks are not reused while it reads them. The compute
stream is never synchronised: the GPU goes on with the previous step while a batch decodes.

Pixels: RGB decodes equal Pillow's (libjpeg-turbo both, same IDCT and upsampling; measured
equal on the CPU). For one-channel models (``L``) the RGB decode is converted with Pillow's
own integer luma (``(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16``), so grey pixels equal
``Image.convert("L")``'s; libjpeg's own greyscale output (the Y plane) differs from it by up
to 10 levels on noisy images.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from oltr.data.datasets import ImageListDataset
from oltr.errors import InputError
from oltr.io import read_bytes

#: JPEG start-of-frame markers torchvision's decoders handle (Huffman: baseline, extended
#: sequential, progressive); SOF3/5-7/9-11/13-15 (lossless, hierarchical, arithmetic) do not.
_DECODABLE_SOF = frozenset({0xC0, 0xC1, 0xC2})
_NOT_SOF = frozenset({0xC4, 0xC8, 0xCC})  # DHT, JPG, DAC share the 0xCn range


def device_decodable(data: bytes | memoryview) -> bool:
    """Whether ``data`` is a JPEG stream for ``torchvision.io.decode_jpeg``: SOI, then a
    SOF0/1/2 frame of 8-bit samples with 1 or 3 components before the first scan. False for
    any other file (and for a header cut short)."""
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return False
    position, size = 2, len(view)
    while position + 4 <= size:
        if view[position] != 0xFF:
            return False
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return False
        length = (view[position + 2] << 8) | view[position + 3]
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if marker not in _DECODABLE_SOF or position + 10 > size:
                return False
            precision, components = view[position + 4], view[position + 9]
            return precision == 8 and components in (1, 3)
        position += 2 + length
    return False


class EncodedImages(Dataset):
    """Item ``i`` of an `ImageListDataset` as ``(payload, label, i)`` without decoding a JPEG:
    ``payload`` is the file's bytes (uint8 (n,)) when :func:`device_decodable`, else the
    image decoded by Pillow (uint8 (C, H, W), the dataset's mode). A file that cannot be read
    raises the dataset's own located error (split file, line, image). Batch the items with
    ``collate_fn=pack_encoded`` (their sizes differ) and open a batch with
    :func:`unpack_encoded`."""

    def __init__(self, dataset: ImageListDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        label = self.dataset.entries[index][1]
        try:
            data = read_bytes(self.dataset.image_path(index), "image")  # never a FIFO's wait
        except (OSError, InputError):
            data = b""  # Pillow then raises the located error
        if device_decodable(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, index
        return pil_tensor(self.dataset, index), label, index

    def image_path(self, index: int) -> Any:
        return self.dataset.image_path(index)

    def error_at(self, index: int, message: str) -> Any:
        return self.dataset.error_at(index, message)


EncodedBatch = tuple[torch.Tensor, torch.Tensor, list[Any], tuple[list[Any], ...]]


def pack_encoded(items: Sequence[tuple[Any, ...]]) -> EncodedBatch:
    """``collate_fn`` for :class:`EncodedImages` items ``(payload, *fields)``, run in the
    DataLoader worker: every JPEG's bytes concatenated into **one** uint8 buffer with offsets
    (B + 1,), the images Pillow decoded kept apart, the other fields as columns (lists).

    One buffer crosses from the worker in one shared-memory segment (and is pinned once),
    where a list of B byte tensors takes B segments: on this project's 2-core CPU (2 workers,
    batch 256, 256 × 320 px JPEGs of 32 KiB; ``python benchmarks/end_to_end.py --device cpu
    --images 4096 --classes 100 --workers 2 --runs bytes``, 2026-11-30) the byte loader alone
    delivered 1,492 img/s with a tensor per image and 9,717 img/s packed (6.5×).
    Returns ``(buffer, offsets, decoded, columns)``; :func:`unpack_encoded` undoes it."""
    payloads = [item[0] for item in items]
    encoded = [p if p.ndim == 1 else p.new_empty(0) for p in payloads]
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    if items:
        torch.cumsum(torch.tensor([len(p) for p in encoded], dtype=torch.int64), 0,
                     out=offsets[1:])
    buffer = torch.cat(encoded) if encoded else torch.empty(0, dtype=torch.uint8)
    decoded = [None if p.ndim == 1 else p for p in payloads]
    columns = tuple(list(column) for column in zip(*(item[1:] for item in items)))
    return buffer, offsets, decoded, columns


def unpack_encoded(batch: EncodedBatch) -> tuple[list[torch.Tensor], tuple[list[Any], ...]]:
    """The payloads of a :func:`pack_encoded` batch (views into its buffer: JPEG bytes (n,);
    or the decoded images (C, H, W)) and its field columns."""
    buffer, offsets, decoded, columns = batch
    bounds = offsets.tolist()
    payloads = [buffer[bounds[i]:bounds[i + 1]] if image is None else image
                for i, image in enumerate(decoded)]
    return payloads, columns


def pil_tensor(dataset: ImageListDataset, index: int) -> torch.Tensor:
    """Image ``index`` decoded by Pillow (`ImageListDataset.load_image`: its mode, its located
    errors) as uint8 (C, H, W)."""
    array = np.asarray(dataset.load_image(index), dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def pillow_luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3, H, W) → uint8 L (1, H, W) exactly as Pillow's ``convert("L")``: ITU-R
    601-2 luma in 16-bit fixed point, ``(19595 R + 38470 G + 7471 B + 32768) >> 16``."""
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).to(torch.uint8).unsqueeze(0)


def decode_images(payloads: Sequence[torch.Tensor], indices: Sequence[int],
                  dataset: ImageListDataset, device: torch.device) -> list[torch.Tensor]:
    """The images of a batch as uint8 (C, H, W) tensors on ``device`` in the dataset's mode:
    JPEG bytes decoded together by ``torchvision.io.decode_jpeg`` (on ``device``), images the
    workers decoded moved there. A batch the decoder refuses is decoded image by image; an
    image it still refuses is read by Pillow, whose error (split file, line, image) is raised
    when it cannot read it either."""
    images: list[torch.Tensor | None] = [None] * len(payloads)
    encoded = [i for i, payload in enumerate(payloads) if payload.ndim == 1]
    if encoded:
        data = [payloads[i] for i in encoded]
        try:
            decoded = _decode_jpeg(data, device)
        except RuntimeError:
            decoded = [_decode_one(payloads[i], indices[i], dataset, device) for i in encoded]
        for i, image in zip(encoded, decoded):
            images[i] = pillow_luma(image) if dataset.mode == "L" and image.shape[0] == 3 \
                else image
    for i, payload in enumerate(payloads):
        if images[i] is None:
            images[i] = payload.to(device, non_blocking=True)
    return images  # type: ignore[return-value]


_SIDE_STREAMS: dict[int, Any] = {}


def _decode_jpeg(data: Any, device: torch.device) -> Any:
    """``torchvision.io.decode_jpeg`` to RGB on ``device``, without torchvision 0.29's
    per-call notice that its image codecs will move to TorchCodec (docs/speed.md). On CUDA
    on a side stream with nothing queued (the module docstring: nvJPEG ignores stream order),
    the outputs handed to the current stream."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode() -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    message="The image decoding and encoding capabilities")
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    if device.type != "cuda":
        return decode()
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    compute = torch.cuda.current_stream(index)
    side.synchronize()  # nothing of the side stream's own still queued when nvJPEG writes
    with torch.cuda.stream(side):
        decoded = decode()
    compute.wait_stream(side)
    for image in decoded if isinstance(decoded, list) else [decoded]:
        image.record_stream(compute)
    return decoded


def _decode_one(data: torch.Tensor, index: int, dataset: ImageListDataset,
                device: torch.device) -> torch.Tensor:
    try:
        return _decode_jpeg(data, device)
    except RuntimeError:
        return pil_tensor(dataset, index).to(device)  # Pillow's located error if unreadable
