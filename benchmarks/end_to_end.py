"""End-to-end training speed from JPEG files: ``oltr train`` as a user runs it, on a generated
ImageNet-LT-shaped benchmark (K = 1000 classes, 256-px JPEGs, the published split-file layout).

    python benchmarks/end_to_end.py --device cuda                 # the GPU run (one H100/H200)
    python benchmarks/end_to_end.py --device cuda --runs device ddp
    python benchmarks/end_to_end.py --device cpu --images 256 --epochs 1 --runs cpu   # smoke

What is timed: the training epochs of ``oltr train`` (``images_per_second`` of each epoch in
``RUN/<stage>/history.jsonl``: images seen ÷ wall seconds of the epoch's steps, the loader's
reading, decoding, augmentation and host-to-device copies included; validation excluded). The
first epoch (workers starting, cuDNN's autotuning) is reported apart; the figure is the median of
the later epochs. Runs (``--runs``, in this order):

- ``bytes`` — the workers' part of ``data.decode: device`` alone (file bytes to the main
  process, nothing decoded), each batch packed into one buffer (``oltr.data.jpeg.pack_encoded``,
  what the loader does) and, as the baseline in the same process, as one tensor per image;
- ``decode`` — the main process's part of ``data.decode: device`` on batches already read and
  packed (no workers): ``decode_images`` (``torchvision.io.decode_jpeg`` on the device, oltr's
  stream-safe call) alone, and the training transform (`DeviceImagenetTransform`: resized
  crops, flip, colour jitter, normalisation) alone on the decoded images — with ``bytes``, where
  the ``loader-device`` figure goes;
- ``loader-cpu`` / ``loader-device`` — the training loader alone (``build_train_loader`` of
  the stage, as ``oltr train`` builds it), iterated for ``--epochs`` epochs without a model:
  batches on the device, augmented and normalised; what the data path can feed;

- ``cpu``    — stage 1 (the plain ResNet-10 of ImageNet-LT's preset), JPEGs decoded by Pillow in
  ``--workers`` DataLoader processes (``data.decode: cpu``, the way the original code loads);
- ``device`` — the same with ``data.decode: device``: workers read file bytes, the batch is
  decoded by ``torchvision.io.decode_jpeg`` on the training device (nvJPEG on CUDA) and augmented
  there (docs/speed.md);
- ``ddp``    — ``device`` under ``torchrun --nproc_per_node G`` (G = the visible GPUs, or 2
  processes on the CPU): DDP with ``nccl`` (``gloo`` on the CPU), the global batch split;
- ``stage2`` — OLTR's stage 2 (modulated attention + meta-embedding + cosine classifier +
  nearest-centroid loss, K = 1000, class-aware sampling) after a one-epoch stage 1, ``device``
  decoding.

The images are generated once into ``--data`` (kept, reused when its description matches):
smooth random colour fields plus noise, 256 × 320 px, JPEG quality 90, about the size and
decoding cost of ImageNet resized to 256 px (their mean file size is reported). Nothing here is
real data: the accuracies mean nothing, the speeds are what a real run's loader meets.
Writes ``OUT/end-to-end-<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oltr.bench import machine_description

HEIGHT, WIDTH = 256, 320
RUNS = ("bytes", "decode", "loader-cpu", "loader-device", "cpu", "device", "ddp", "stage2")
WNID = "n{:08d}"


# --------------------------------------------------------------------------- the data
def _write_images(job: tuple[str, list[tuple[str, int]]]) -> int:
    """Write each ``(relative path, seed)`` under ``root``; return the bytes written."""
    root, items = job
    written = 0
    for relative, seed in items:
        rng = np.random.default_rng(seed)
        small = Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
        field = np.asarray(small.resize((WIDTH, HEIGHT), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        path = Path(root) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        written += path.stat().st_size
    return written


def make_dataset(directory: Path, images: int, *, classes: int, workers: int, seed: int = 0
                 ) -> dict[str, Any]:
    """An ImageNet-LT-shaped directory: ``images/train/<wnid>/…JPEG`` for ``images`` train
    images (class ``i % classes``), 2 val and 2 test images per class, 500 open images, and the
    published lists ``ImageNet_LT_{train,val,test,open}.txt``. Reused when ``description.json``
    matches; a different folder content is never overwritten (ValueError)."""
    description = {"images": images, "classes": classes, "height": HEIGHT, "width": WIDTH,
                   "seed": seed, "format": 1}
    stamp = directory / "description.json"
    if stamp.exists():
        found = json.loads(stamp.read_text())
        if {k: found.get(k) for k in description} == description:
            return found
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and holds something other than this benchmark's "
                         "data: pass another --data")
    started = time.perf_counter()
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": [], "open": []}
    items: list[tuple[str, int]] = []  # under images/ (the ImageNet folder)
    for n in range(images):
        label = n % classes
        relative = f"train/{WNID.format(label)}/{WNID.format(label)}_{n}.JPEG"
        splits["train"].append(f"{relative} {label}")
        items.append((relative, seed * 10**7 + n))
    for split, base in (("val", 1), ("test", 2)):
        for k in range(2 * classes):
            label = k % classes
            relative = f"{split}/{WNID.format(label)}/{split}_{k}.JPEG"
            splits[split].append(f"{relative} {label}")
            items.append((relative, seed * 10**7 + base * 10**6 + k))
    # the open images sit beside the lists, as in the published ImageNet-LT directory
    open_items = [(f"ImageNet_LT_open/open_{k}.JPEG", seed * 10**7 + 3 * 10**6 + k)
                  for k in range(500)]
    splits["open"] = [f"open_{k}.JPEG -1" for k in range(500)]
    directory.mkdir(parents=True, exist_ok=True)
    chunks = workers * 8
    jobs = ([(str(directory / "images"), items[i::chunks]) for i in range(chunks)]
            + [(str(directory), open_items[i::chunks]) for i in range(chunks)])
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(_write_images, jobs))
    for split, lines in splits.items():
        (directory / f"ImageNet_LT_{split}.txt").write_text("".join(f"{x}\n" for x in lines))
    description |= {"mean_file_kib": total / (len(items) + len(open_items)) / 1024,
                    "generation_seconds": time.perf_counter() - started}
    stamp.write_text(json.dumps(description, indent=2) + "\n")
    return description


# --------------------------------------------------------------------------- the runs
def train_command(run: str, args: argparse.Namespace, out: Path, gpus: int) -> list[str]:
    """The ``oltr train`` command line of ``run`` (under torchrun for ``ddp``: torchrun's own
    rendezvous on this host, each of the ``gpus`` processes with ``workers / gpus`` loaders)."""
    method, stage_overrides = (("oltr", ["stage1.train.epochs=1",
                                         f"stage2.train.epochs={args.epochs}"])
                               if run == "stage2" else ("plain", [f"train.epochs={args.epochs}"]))
    workers = max(1, args.workers // gpus) if run == "ddp" else args.workers
    oltr = ["-m", "oltr", "train", "--benchmark", "imagenet_lt", "--method", method,
            "--data", str(args.data), "--out", str(out), "--device", args.device,
            "--no-progress", *stage_overrides,
            f"data.image_root={args.data / 'images'}",
            f"data.decode={'cpu' if run == 'cpu' else 'device'}",
            f"data.num_workers={workers}", f"train.batch_size={args.batch}",
            f"eval.batch_size={2 * args.batch}"]
    if run == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={gpus}", *oltr]
    return [sys.executable, *oltr]


def read_epochs(out: Path, stage: str) -> list[dict[str, Any]]:
    path = out / stage / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def epoch_row(run: str, command: str, exit_code: Any, started: float, speeds: list[float],
              processes: int = 1) -> dict[str, Any]:
    """A table row from a run's images per second per epoch (the first epoch reported apart,
    the figure the median of the later ones)."""
    later = speeds[1:] or speeds
    return {"run": run, "command": command, "exit": exit_code,
            "wall_seconds": time.perf_counter() - started, "epochs": len(speeds),
            "first_epoch_per_second": speeds[0] if speeds else None,
            "per_second": statistics.median(later) if later else None,
            "all_epochs_per_second": speeds, "processes": processes}


def stage_and_benchmark(args: argparse.Namespace, decode: str, device: str
                        ) -> tuple[dict[str, Any], Any]:
    """The flat config of ImageNet-LT's plain stage as these runs set it, and the benchmark."""
    from oltr.config import load_config, stage_config
    from oltr.data import load_benchmark

    cfg = stage_config(load_config("plain", benchmark="imagenet_lt", overrides=[
        f"data.decode={decode}", f"data.num_workers={args.workers}",
        f"train.batch_size={args.batch}", f"data.image_root={args.data / 'images'}",
        f"device={device}"]), "main")
    return cfg, load_benchmark(args.data, image_root=cfg["data"]["image_root"])


def bytes_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``bytes`` rows: the DataLoader of ``data.decode: device`` delivering file bytes,
    one tensor per image (``collate_fn=list``, the baseline) vs packed per batch."""
    from oltr.data import dataset_for
    from oltr.data.jpeg import EncodedImages, pack_encoded
    from oltr.data.loader import ImageLoader
    from oltr.runtime import Runtime
    from oltr.train.loaders import _EncodedItems, _TaggedSampler, make_sampler

    cfg, bench = stage_and_benchmark(args, "device", "cpu")
    dataset = dataset_for(bench, "train", cfg["data"], train=True)
    sampler = make_sampler(dataset.labels, cfg["train"], 0, Runtime(torch.device("cpu")))
    loaders = {name: ImageLoader(_EncodedItems(EncodedImages(dataset)),
                                 sampler=_TaggedSampler(sampler), batch_size=args.batch,
                                 num_workers=args.workers, drop_last=True,
                                 pin_memory=args.device == "cuda",
                                 persistent_workers=args.workers > 0, collate_fn=collate)
               for name, collate in (("bytes-per-image", list), ("bytes", pack_encoded))}
    speeds: dict[str, list[float]] = {name: [] for name in loaders}
    started = time.perf_counter()
    for epoch in range(args.epochs):  # interleaved, so drift hits both alike
        for name, loader in loaders.items():
            sampler.set_epoch(epoch)
            start, seen = time.perf_counter(), 0
            for _ in loader:
                seen += args.batch
            speeds[name].append(seen / (time.perf_counter() - start))
    return [epoch_row(name, "the byte loader alone", 0, started, values)
            for name, values in speeds.items()]


def decode_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``decode`` rows: ``decode_images`` alone and the training transform alone, on up to
    4 batches read and packed beforehand (pinned on CUDA, as the loader's are), each timed
    over all of them once per ``--epochs`` repetition, the device synchronised."""
    from oltr.data import dataset_for
    from oltr.data.augment import DeviceImagenetTransform
    from oltr.data.jpeg import EncodedImages, decode_images, pack_encoded, unpack_encoded

    cfg, bench = stage_and_benchmark(args, "device", args.device)
    device = torch.device(args.device)
    dataset = dataset_for(bench, "train", cfg["data"], train=True)
    encoded = EncodedImages(dataset)
    size = min(args.batch, len(dataset))
    batches = []
    for b in range(max(1, min(4, len(dataset) // size))):
        buffer, offsets, decoded, columns = pack_encoded(
            [encoded[i] for i in range(b * size, (b + 1) * size)])
        batches.append((buffer.pin_memory() if device.type == "cuda" else buffer, offsets,
                        decoded, columns))
    data_cfg = cfg["data"]
    transform = DeviceImagenetTransform(data_cfg["image_size"], data_cfg["mean"],
                                        data_cfg["std"], train=True, seed=0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def decode_all() -> list[tuple[list[torch.Tensor], np.ndarray]]:
        out = []
        for batch in batches:
            payloads, (_, indices) = unpack_encoded(batch)  # positions: the indices will do
            out.append((decode_images(payloads, indices, dataset, device),
                        np.asarray(indices, dtype=np.int64)))
        sync()
        return out

    images_of_batches = decode_all()

    def transform_all() -> None:
        for images, positions in images_of_batches:
            transform(images, positions)
        sync()

    seen = size * len(batches)
    speeds: dict[str, list[float]] = {"decode": [], "transform": []}
    started = time.perf_counter()
    for epoch in range(args.epochs):
        transform.set_epoch(epoch)
        for name, work in (("decode", decode_all), ("transform", transform_all)):
            start = time.perf_counter()
            work()
            speeds[name].append(seen / (time.perf_counter() - start))
    return [epoch_row(name, f"{name} of {len(batches)} batches of {size}, main process", 0,
                      started, values) for name, values in speeds.items()]


def loader_speed(run: str, args: argparse.Namespace) -> dict[str, Any]:
    """Images per second of the training loader alone (``loader-cpu`` / ``loader-device``)."""
    from oltr.runtime import Runtime
    from oltr.train.loaders import build_train_loader

    decode = run.split("-", 1)[1]
    cfg, bench = stage_and_benchmark(args, decode, args.device)
    device = torch.device(args.device)
    loader = build_train_loader(bench, cfg, Runtime(device))
    started, speeds = time.perf_counter(), []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for _, labels in loader:
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        speeds.append(seen / (time.perf_counter() - start))
    return epoch_row(run, f"build_train_loader (data.decode={decode})", 0, started, speeds)


def measure(run: str, args: argparse.Namespace, gpus: int, log_dir: Path) -> dict[str, Any]:
    """Run one ``oltr train`` into ``WORK/RUN`` and read its epochs' images per second. A
    folder there from an earlier run is replaced only when oltr's run marker shows oltr wrote
    it (`oltr.ownership`); anything else stays, and ``oltr train`` refuses it (an error row)."""
    from oltr.ownership import remove_owned_tree

    out = args.work / run
    remove_owned_tree(out, "run")
    command = train_command(run, args, out, gpus)
    started = time.perf_counter()
    with open(log_dir / f"end-to-end-{run}.log", "w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    epochs = read_epochs(out, "stage2" if run == "stage2" else "main")
    return epoch_row(run, " ".join(command[1:]), code, started,
                     [e["images_per_second"] for e in epochs],
                     processes=gpus if run == "ddp" else 1)


LABELS = {"bytes-per-image": "file bytes alone, one tensor per image (the former loader)",
          "bytes": "file bytes alone, packed per batch (data.decode: device's workers)",
          "decode": "decode_images alone (decode_jpeg on the device), main process",
          "transform": "the training transform alone on decoded images, main process",
          "loader-cpu": "the loader alone, Pillow decoding in {w} worker processes",
          "loader-device": "the loader alone, decoding on the device",
          "cpu": "stage 1, Pillow decoding in {w} worker processes",
          "device": "stage 1, decoding on the device (data.decode: device)",
          "ddp": "stage 1, decoding on the device, DDP: torchrun × {g}",
          "stage2": "stage 2 (OLTR, K = 1000), decoding on the device"}


def format_table(result: dict[str, Any]) -> str:
    data = result["data"]
    lines = [f"Machine: {result['machine']}",
             (f"Data: {data['images']} train JPEGs {data['width']}×{data['height']} px, "
             f"mean {data['mean_file_kib']:.0f} KiB; batch {result['batch']}, "
             f"{result['epochs']} epochs per run, {result['workers']} loader workers"), "",
             "| run | img/s (median, epochs 2+) | first epoch img/s | exit |",
             "| --- | ---: | ---: | --- |"]
    for row in result["rows"]:
        label = LABELS[row["run"]].format(w=result["workers"], g=row["processes"])
        speed = "—" if row["per_second"] is None else f"{row['per_second']:,.0f}"
        first = ("—" if row["first_epoch_per_second"] is None
                 else f"{row['first_epoch_per_second']:,.0f}")
        lines.append(f"| {label} | {speed} | {first} | {row['exit']} |")
    by_run = {row["run"]: row["per_second"] for row in result["rows"]}
    if by_run.get("bytes") and by_run.get("bytes-per-image"):
        lines += ["", ("file bytes packed per batch vs a tensor per image: "
                       f"{by_run['bytes'] / by_run['bytes-per-image']:.2f}×")]
    if by_run.get("cpu") and by_run.get("device"):
        lines += ["", (f"decoding on the device vs Pillow workers: "
                      f"{by_run['device'] / by_run['cpu']:.2f}×")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=32_000, help="train images (default 32000)")
    parser.add_argument("--classes", type=int, default=1000, help="K (default 1000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: the CPU cores less one)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--data", type=Path, default=Path("runs/end-to-end/data"))
    parser.add_argument("--work", type=Path, default=Path("runs/end-to-end/runs"),
                        help="scratch run folders (a run's earlier folder is replaced when "
                             "oltr wrote it)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    cores = len(os.sched_getaffinity(0))
    args.workers = args.workers or max(1, cores - 1)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    print(f"[end-to-end] generating {args.images} JPEGs into {args.data}", file=sys.stderr,
          flush=True)
    data = make_dataset(args.data, args.images, classes=args.classes, workers=max(1, cores))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_description(), "device": args.device,
                              "data": data, "batch": args.batch, "epochs": args.epochs,
                              "workers": args.workers, "rows": []}
    stem = args.out / f"end-to-end-{args.device}"
    for run in args.runs:
        print(f"[end-to-end] {run}", file=sys.stderr, flush=True)
        try:
            rows = (bytes_speed(args) if run == "bytes" else decode_speed(args)
                    if run == "decode" else
                    [loader_speed(run, args)] if run.startswith("loader-")
                    else [measure(run, args, gpus, args.out)])
        except Exception as error:  # noqa: BLE001 -- a failed run is a row, the others go on
            rows = [{"run": run, "exit": f"{type(error).__name__}: {error}"[:200],
                     "per_second": None, "first_epoch_per_second": None, "processes": 1}]
        result["rows"] += rows
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        print(format_table(result), file=sys.stderr, flush=True)
    table = format_table(result)
    print(table)
    stem.with_suffix(".md").write_text(table)
    return result


if __name__ == "__main__":
    main()
