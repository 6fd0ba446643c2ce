"""data.decode: device — JPEG bytes decoded, augmented and normalised as a batch on the device
(here device=cpu: torchvision's decode_jpeg runs on the CPU too); the device prefetcher."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from oltr.config import load_config, stage_config
from oltr.data import dataset_for, load_benchmark
from oltr.data.augment import DeviceImagenetTransform, color_jitter, resized_crop_params
from oltr.data.jpeg import EncodedImages, device_decodable, pillow_luma
from oltr.errors import InputError
from oltr.inference import EvalBatches
from oltr.runtime import Runtime
from oltr.train.loaders import (
    DeviceDecodeTrainLoader,
    DevicePrefetcher,
    build_train_loader,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = Runtime(torch.device("cpu"))


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, photo-like RGB image (gradients, a disc, mild noise), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(3 * x + seed), np.cos(2 * y - seed), np.sin(2 * (x + y))], axis=2)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05)[..., None] * rng.uniform(-0.6, 0.6, 3)
    image = 127.5 * (1 + 0.8 * base + disc) + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def jpeg_benchmark(root: Path) -> Path:
    """3 classes of JPEGs of varied sizes (one progressive, one grey, one CMYK) and a PNG
    named .JPEG in train; split files as a plain benchmark directory."""
    (root / "i").mkdir(parents=True)
    sizes = [(60, 80), (75, 50), (64, 64), (90, 70), (48, 100), (80, 60)]
    splits = {"train": range(12), "val": range(12, 18), "test": range(18, 21)}
    for split, numbers in splits.items():
        lines = []
        for n in numbers:
            name = f"i/{split}{n}.JPEG"
            array = photo(*sizes[n % len(sizes)], seed=n)
            if n == 3:
                data = jpeg_bytes(array, progressive=True)
            elif n == 4:
                data = jpeg_bytes(array, "L")
            elif n == 5:
                data = jpeg_bytes(array, "CMYK")
            elif n == 7:
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                data = buffer.getvalue()
            else:
                data = jpeg_bytes(array)
            (root / name).write_bytes(data)
            lines.append(f"{name} {n % 3}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def data_config(*overrides: str) -> dict:
    return stage_config(load_config("plain", benchmark="imagenet_lt", overrides=[
        "data.image_size=32", "data.num_workers=0", "device=cpu", "train.batch_size=4",
        *overrides]), "main")


def test_which_files_the_device_decodes():
    array = photo(40, 50, 0)
    assert device_decodable(jpeg_bytes(array))
    assert device_decodable(jpeg_bytes(array, progressive=True))
    assert device_decodable(jpeg_bytes(array, "L"))
    assert not device_decodable(jpeg_bytes(array, "CMYK"))  # 4 components: Pillow
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    assert not device_decodable(png.getvalue())
    assert not device_decodable(jpeg_bytes(array)[:12])  # header cut before the frame
    assert not device_decodable(b"")


def test_pillow_luma_is_pillows_grey():
    array = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    rgb = torch.from_numpy(array).permute(2, 0, 1)
    grey = np.array(Image.fromarray(array).convert("L"))
    assert torch.equal(pillow_luma(rgb)[0], torch.from_numpy(grey))


def test_eval_batches_match_the_pil_transform(tmp_path):
    """The device eval path (decode_jpeg on the CPU, torchvision resize + centre crop) against
    the PIL eval transform, on photo-like JPEGs of 6 sizes, a progressive, a grey and a CMYK
    JPEG and a PNG: decoded pixels are equal (libjpeg-turbo both); the antialiased resize
    rounds differently in a few pixels: at most 1/255 per pixel, mean below 0.05/255
    (measured: max 1/255 in 0.4 % of the pixels, mean 0.004/255 at 32 px; 0.0001/255 at
    224 px; ÷ std in normalised units, max 0.0175)."""
    bench = load_benchmark(jpeg_benchmark(tmp_path / "b"))
    batches = {}
    for decode in ("cpu", "device"):
        cfg = data_config(f"data.decode={decode}")
        dataset = dataset_for(bench, "train", cfg["data"], train=False)
        batches[decode] = list(EvalBatches(dataset, cfg["data"], batch_size=5,
                                           device=torch.device("cpu")))
    std = torch.tensor(data_config()["data"]["std"]).view(1, 3, 1, 1)
    for (pil, pil_labels), (device, labels) in zip(batches["cpu"], batches["device"]):
        assert device.dtype == torch.float32 and device.shape == pil.shape
        assert torch.equal(labels, pil_labels)
        levels = ((device - pil) * std * 255).abs()
        assert float(levels.max()) <= 1.0 + 1e-3
        assert float(levels.mean()) <= 0.05


def test_training_batches_are_a_function_of_seed_epoch_and_position(tmp_path):
    bench = load_benchmark(jpeg_benchmark(tmp_path / "b"))
    cfg = data_config("data.decode=device")
    loader = build_train_loader(bench, cfg, CPU)
    assert isinstance(loader, DeviceDecodeTrainLoader)
    loader.set_epoch(0)
    first = list(loader)
    loader.set_epoch(0)
    again = list(loader)
    mean = torch.tensor(cfg["data"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["data"]["std"]).view(1, 3, 1, 1)
    for (images, labels), (images2, labels2) in zip(first, again):
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
        pixels = images * std + mean  # back to [0, 1]
        assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    # batches of 2 instead of 4: each position gets the same image
    halves = build_train_loader(bench, data_config("data.decode=device", "train.batch_size=2"),
                                CPU)
    halves.set_epoch(0)
    small = torch.cat([images for images, _ in halves])
    assert torch.allclose(small, torch.cat([images for images, _ in first]), atol=1e-6)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], first[0][0])


def test_an_unreadable_jpeg_names_split_file_and_line(tmp_path):
    root = jpeg_benchmark(tmp_path / "b")
    data = (root / "i" / "val14.JPEG").read_bytes()
    (root / "i" / "val14.JPEG").write_bytes(data[:len(data) // 2])  # truncated after the header
    bench = load_benchmark(root)
    cfg = data_config("data.decode=device")
    dataset = dataset_for(bench, "val", cfg["data"], train=False)
    assert device_decodable(EncodedImages(dataset)[2][0].numpy().tobytes())
    with pytest.raises(InputError) as info:
        list(EvalBatches(dataset, cfg["data"], batch_size=4, device=torch.device("cpu")))
    assert str(info.value).startswith(f"{root / 'val.txt'}:3: cannot read image "
                                      f"{root / 'i' / 'val14.JPEG'} (")


def test_random_resized_crop_draws_follow_torchvision():
    """The vectorised RandomResizedCrop parameters against torchvision's ``get_params`` on a
    300×200 image, 4000 draws each: the crop area fraction and log aspect ratio have the same
    distributions (two-sample Kolmogorov–Smirnov p > 0.001), every crop lies in the image."""
    n = 4000
    heights, widths = np.full(n, 200), np.full(n, 300)
    top, left, h, w = resized_crop_params(heights, widths, seed=0, epoch=0, positions=np.arange(n))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    torch.manual_seed(0)
    image = torch.zeros(3, 200, 300)
    reference = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                          for _ in range(n)])
    for ours, theirs in ((h * w / 60000, reference[:, 2] * reference[:, 3] / 60000),
                         (np.log(w / h), np.log(reference[:, 3] / reference[:, 2]))):
        assert stats.ks_2samp(ours, theirs).pvalue > 0.001


def test_color_jitter_is_torchvisions_in_the_drawn_order():
    x = torch.rand(2, 3, 8, 8)
    factors = [torch.tensor([0.7, 1.3]), torch.tensor([1.2, 0.8]), torch.tensor([0.6, 1.4])]
    order = torch.tensor([[0, 1, 2], [2, 0, 1]])
    got = color_jitter(x.clone(), *factors, order)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for b in range(2):
        expected = x[b]
        for op in order[b].tolist():
            expected = adjust[op](expected, float(factors[op][b]))
        assert torch.allclose(got[b], expected, atol=1e-6)


def test_color_jitter_equals_the_three_way_form_bit_for_bit():
    """One blend per step with a per-sample factor and reference gives exactly what computing
    brightness, contrast and saturation for every sample and picking one gives."""
    import itertools

    def three_way(x, f_b, f_c, f_s, order):
        shape = (-1, 1, 1, 1)
        f_b, f_c, f_s = (f.to(x).view(shape) for f in (f_b, f_c, f_s))
        for step in range(3):
            op = order[:, step].view(shape)
            grey = 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            bright = (f_b * x).clamp(0, 1)
            contrasted = (f_c * x + (1 - f_c) * grey.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
            saturated = (f_s * x + (1 - f_s) * grey).clamp(0, 1)
            x = torch.where(op == 0, bright, torch.where(op == 1, contrasted, saturated))
        return x

    generator = torch.Generator().manual_seed(0)
    order = torch.tensor(list(itertools.permutations(range(3))) * 2)  # all 6 orders, twice
    x = torch.rand(len(order), 3, 16, 16, generator=generator)
    factors = [0.6 + 0.8 * torch.rand(len(order), generator=generator, dtype=torch.float64)
               for _ in range(3)]
    assert torch.equal(color_jitter(x.clone(), *factors, order), three_way(x, *factors, order))


def test_device_transform_output_for_grey_models(tmp_path):
    bench = load_benchmark(jpeg_benchmark(tmp_path / "b"))
    cfg = data_config("data.decode=device", "data.channels=1", "data.mean=[0.5]",
                      "data.std=[0.25]")
    loader = build_train_loader(bench, cfg, CPU)
    loader.set_epoch(0)
    images, _ = next(iter(loader))
    assert images.shape == (4, 1, 32, 32)
    transform = DeviceImagenetTransform(32, [0.5], [0.25], train=False)
    assert transform([torch.full((1, 40, 50), 128, dtype=torch.uint8)]).shape == (1, 1, 32, 32)


def test_prefetcher_normalises_uint8_exactly_as_to_tensor_and_normalize(tmp_path):
    """The file loader's workers now return uint8; the prefetcher normalises on the device:
    the batches equal ToTensor + Normalize of the same pixels (transform none: no
    augmentation)."""
    bench = load_benchmark(jpeg_benchmark(tmp_path / "b"))
    cfg = data_config("data.transform=none", "data.loader=files", "data.image_size=8",
                      "train.batch_size=1")
    loader = build_train_loader(bench, cfg, CPU)
    assert isinstance(loader, DevicePrefetcher)
    loader.set_epoch(0)
    _, indices = loader.sampler.stream()
    dataset = dataset_for(bench, "train", cfg["data"], train=False)
    for (images, labels), index in zip(loader, indices):
        expected, label = dataset[int(index)]
        assert torch.equal(images[0], expected) and int(labels[0]) == label


# --------------------------------------------------------------------------- on a GPU
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_gpu_eval_batches_match_the_pil_transform(tmp_path):
    """nvJPEG decoding and torchvision's float resize on the GPU against the PIL eval
    transform. nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: measured on an
    H200 (torchvision 0.26, benchmarks/gpu.sh, 2026-11-30) at most 14/255 on a pixel, mean
    0.38/255; the bound is 16/255 per pixel and 0.5/255 on average (docs/speed.md)."""
    bench = load_benchmark(jpeg_benchmark(tmp_path / "b"))
    batches = {}
    for decode, device in (("cpu", "cpu"), ("device", "cuda")):
        cfg = data_config(f"data.decode={decode}")
        dataset = dataset_for(bench, "train", cfg["data"], train=False)
        batches[decode] = torch.cat([images.cpu() for images, _ in EvalBatches(
            dataset, cfg["data"], batch_size=5, device=torch.device(device))])
    std = torch.tensor(data_config()["data"]["std"]).view(1, 3, 1, 1)
    levels = ((batches["device"] - batches["cpu"]) * std * 255).abs()
    print(f"GPU eval vs PIL: max {float(levels.max()):.3f}/255, mean {float(levels.mean()):.4f}/255")
    assert float(levels.max()) <= 16.0 and float(levels.mean()) <= 0.5


@CUDA
def test_gpu_training_batches_and_prefetcher(tmp_path):
    bench = load_benchmark(jpeg_benchmark(tmp_path / "b"))
    gpu = Runtime(torch.device("cuda"))
    loader = build_train_loader(bench, data_config("data.decode=device"), gpu)
    loader.set_epoch(0)
    first = [images for images, _ in loader]
    loader.set_epoch(0)
    assert all(images.device.type == "cuda" for images in first)
    assert all(torch.equal(a, b) for a, b in zip(first, [images for images, _ in loader]))
    cfg = data_config("data.transform=none", "data.loader=files", "data.image_size=8",
                      "train.batch_size=1")
    on_gpu, on_cpu = (build_train_loader(bench, cfg, runtime) for runtime in (gpu, CPU))
    for loader in (on_gpu, on_cpu):
        loader.set_epoch(0)
    for (a, la), (b, lb) in zip(on_gpu, on_cpu):  # side-stream copies, normalised on the GPU
        # normalised on the GPU: equal to the CPU's ToTensor + Normalize within float rounding
        # (the division rounds differently there; measured on an H200, 2026-11-30)
        assert a.device.type == "cuda" and torch.equal(la.cpu(), lb)
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6)


@CUDA
def test_gpu_decode_never_writes_memory_that_queued_work_still_reads(tmp_path):
    """nvJPEG's hardware decoder ignores stream order (oltr/data/jpeg.py): with a long kernel
    queued, reductions over tensors of a decoded image's byte size queued behind it, and
    those tensors freed, a decode must not overwrite them before the reductions run. Counts
    the corrupted trials of plain ``torchvision.io.decode_jpeg`` too (printed, not asserted:
    it depends on the GPU having the hardware decoder)."""
    from torchvision.io import decode_jpeg

    from oltr.data.jpeg import _decode_jpeg

    data = [torch.frombuffer(bytearray(jpeg_bytes(photo(256, 320, seed=k))), dtype=torch.uint8)
            for k in range(8)]
    elements = 3 * 256 * 320 // 4  # float32 elements in one decoded image's bytes
    expected = torch.tensor([float(k + 1) * elements for k in range(len(data))])
    cuda = torch.device("cuda")

    def corrupted(decode) -> int:
        wrong = 0
        for _ in range(20):
            tensors = [torch.full((elements,), float(k + 1), device=cuda)
                       for k in range(len(data))]
            torch.cuda._sleep(50_000_000)  # ~25 ms of queued work before the reductions
            sums = [t.sum() for t in tensors]
            del tensors  # freed while the reductions are still queued
            decode()
            wrong += int(not torch.equal(torch.stack(sums).cpu(), expected))
        return wrong

    plain = corrupted(lambda: decode_jpeg(data, device=cuda))
    ours = corrupted(lambda: _decode_jpeg(data, cuda))
    print(f"corrupted trials of 20: torchvision.io.decode_jpeg {plain}, oltr {ours}")
    assert ours == 0


def test_pack_encoded_round_trip():
    """A batch of byte payloads and a Pillow-decoded image crosses as one buffer + offsets and
    comes back as the same payloads, in order, with its field columns."""
    from oltr.data.jpeg import pack_encoded, unpack_encoded

    jpeg_a = torch.tensor([255, 216, 1, 2, 3], dtype=torch.uint8)
    jpeg_b = torch.tensor([255, 216, 9], dtype=torch.uint8)
    decoded = torch.arange(12, dtype=torch.uint8).view(3, 2, 2)
    batch = pack_encoded([(jpeg_a, 0, 10, 100), (decoded, 1, 11, 101), (jpeg_b, 2, 12, 102)])
    buffer, offsets, _, _ = batch
    assert buffer.tolist() == [255, 216, 1, 2, 3, 255, 216, 9]
    assert offsets.tolist() == [0, 5, 5, 8]
    payloads, (labels, indices, positions) = unpack_encoded(batch)
    assert [p.tolist() for p in payloads] == [jpeg_a.tolist(), decoded.tolist(), jpeg_b.tolist()]
    assert (labels, indices, positions) == ([0, 1, 2], [10, 11, 12], [100, 101, 102])
