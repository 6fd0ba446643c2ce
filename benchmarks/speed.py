"""Training and inference speed and peak memory of oltr, optionally against the original code.

    python benchmarks/speed.py                         # CPU: batch 32 at 224 px, 128 at 28 px
    python benchmarks/speed.py --device cuda           # GPU: batch 128 at both sizes
    python benchmarks/speed.py --original /tmp/OLTR    # + the original's stage-1/2 steps
    python benchmarks/speed.py --compile               # + train.compile rows
    python benchmarks/speed.py --quick                 # smoke run (tests/test_speed_benchmark.py)

One table (printed, and written as ``OUT/speed-<device>.json`` and ``.md``):

- **train stage 1 / stage 2** — optimiser steps of oltr's own loop (`train_one_epoch`, the
  presets' networks and losses: ``configs/<benchmark>/oltr.yaml``) at the paper's ImageNet-LT
  size (ResNet-10 from scratch, 224 px, K = 1000; stage 2 = modulated attention +
  meta-embedding + cosine classifier + nearest-centroid loss) and at the default benchmark's
  size (Fashion-MNIST-LT's preset ResNet-10, width 16, 28 px grey, K = 8); img/s and peak memory.
- **stage-2 head** — meta-embedding + nearest-centroid loss + cosine classifier, forward and
  backward at B = 128, K = 1000, d = 512: oltr's (B×K distances, ``torch.cdist``) against a
  straightforward B×K×d version written here as the original code does it (expand, subtract,
  norm; sort for the nearest centroid), which is checked to compute the same values.
- **frozen-backbone stage 2** — one epoch of cRT's stage 2 (both sizes; pooled rows) and of
  OLTR's stage 2 with a frozen backbone (Places-LT's protocol, 224 px; feature-map rows, since
  modulated attention stays trainable) on images, and on the rows of the feature cache
  (`oltr.features`; rows resident in device memory, as a cache up to 2 GiB is); the one-time
  pass that computes the rows is its own row.
- **backbone alone** — the preset's backbone, forward + backward + SGD, nothing else: the
  least work of any step that trains it, so ``backbone alone ÷ original stage 2`` bounds what
  any implementation of the stage-2 step computing the same convolutions can gain.
- **inference** — the stage-2 network's forward passes (`oltr.inference.collect_outputs`).
- ``--original PATH`` (a checkout of github.com/zhmiao/OpenLongTailRecognition-OLTR): its
  stage-1 step (ResNet-10 + dot-product classifier + cross-entropy) and stage-2 step (ResNet-10
  with modulated attention and ``fc_add`` + MetaEmbedding_Classifier + DiscCentroidsLoss with
  weight 0.01, two SGD optimisers) as its ``run_networks.py`` takes them, imported from PATH
  (its files are not changed nor copied), timed in this process between oltr's steps.

Method: synthetic data already on the device (no loading or decoding is timed), fixed seeds,
warm-up units excluded, the cases interleaved within each repetition (so drift of the machine
hits all alike), the median of ``--repeats`` repetitions. Peak memory is the most memory held
during a unit above what was held before it (weights, gradients and optimiser state were
there already), measured in one more unit per case after the timed ones: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the peak resident set size (``VmHWM``, reset
before the unit through ``/proc/self/clear_refs``; Linux ≥ 4.0) with glibc's malloc told to
return every block ≥ 128 KiB to the system when freed (``mallopt``; set only after the timing,
since it costs page faults) and ``malloc_trim`` before the unit, so that the resident size
follows live tensors — tracemalloc would not see tensor memory at all.
oltr runs with its defaults (``train.amp: auto`` — bf16 autocast where bf16 is native —, channels
last); where auto means bf16 (CUDA), oltr's fp32 rows are added, compared with the original's
fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import importlib
import io
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oltr.bench import machine_description
from oltr.config import load_config, stage_config
from oltr.losses import NearestCentroidLoss
from oltr.models import OLTRNetwork, create_network, freeze_backbone
from oltr.models.classifiers import CosineClassifier
from oltr.models.memory import MetaEmbedding
from oltr.runtime import Runtime, uses_bf16
from oltr.train.loop import train_one_epoch
from oltr.train.objective import Objective, TrainTask
from oltr.train.stage import lr_factor

MIB = 2**20


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Size:
    """One benchmark size: the preset whose networks and losses it uses, and the data shape."""

    name: str
    benchmark: str
    image_size: int
    channels: int
    classes: int
    batch: int
    eval_batch: int
    cache_batches: int  # batches in the frozen-backbone epoch


def sizes(device: torch.device, quick: bool) -> list[Size]:
    """ImageNet-LT's and Fashion-MNIST-LT's sizes on ``device`` (``quick``: small batches)."""
    gpu = device.type == "cuda"
    if quick:
        return [Size("imagenet_lt", "imagenet_lt", 224, 3, 1000, 2, 4, 2),
                Size("fmnist_lt", "fmnist_lt", 28, 1, 8, 16, 32, 2)]
    return [Size("imagenet_lt", "imagenet_lt", 224, 3, 1000, 128 if gpu else 32,
                 256 if gpu else 64, 8 if gpu else 4),
            Size("fmnist_lt", "fmnist_lt", 28, 1, 8, 128, 512, 8)]


def stage_cfg(size: Size, method: str, stage: str, *extra: str) -> dict[str, Any]:
    """The flat config of ``stage`` of ``method`` at ``size`` (the preset's network and loss)."""
    return stage_config(load_config(method, benchmark=size.benchmark, overrides=[
        f"train.batch_size={size.batch}", "device=cpu", *extra]), stage)


def train_counts(classes: int) -> np.ndarray:
    """A long-tailed count per class (only losses that weigh classes read it)."""
    return np.maximum(1, np.round(1280 * 0.995 ** np.arange(classes))).astype(np.int64)


# --------------------------------------------------------------------------- measuring
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Make glibc's malloc serve every block ≥ 128 KiB by mmap and trim freed memory at once
    (``mallopt``; fixed thresholds also stop its dynamic raising), so the process's resident
    size follows its live tensors. False where this is not glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(
        libc.mallopt(m_trim_threshold, 128 * 1024))


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """The most memory held during the ``with`` block above what was held at its start, in
    bytes (``peak``; None where it cannot be measured): CUDA's allocator statistics, or the
    peak resident set size of this process, reset at the start (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)  # hand memory freed earlier back, so reusing it shows again
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status_kib("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            high = _status_kib("VmHWM")
            self.peak = None if high is None else max(0, high - self.base) * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """A measured unit of work: ``run()`` processes ``images`` images (or head samples)."""

    name: str
    size: str
    batch: int
    precision: str
    images: int
    run: Callable[[], Any]
    group: str = ""
    seconds: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)

    def measure_time(self, device: torch.device) -> None:
        synchronize(device)
        start = time.perf_counter()
        self.run()
        synchronize(device)
        self.seconds.append(time.perf_counter() - start)

    def measure_memory(self, device: torch.device) -> None:
        with PeakMemory(device) as memory:
            self.run()
        if memory.peak is not None:
            self.peaks.append(memory.peak)

    def row(self) -> dict[str, Any]:
        rates = [self.images / s for s in self.seconds]
        return {"case": self.name, "size": self.size, "batch": self.batch,
                "precision": self.precision, "group": self.group,
                "per_second": statistics.median(rates), "min": min(rates), "max": max(rates),
                "repeats": len(rates),
                "peak_mib": statistics.median(self.peaks) / MIB if self.peaks else None}


# --------------------------------------------------------------------------- oltr's cases
def _batch(size: Size, batch: int, device: torch.device, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, size.channels, size.image_size, size.image_size,
                         generator=generator)
    labels = torch.randint(0, size.classes, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def build_net(cfg: dict[str, Any], size: Size, device: torch.device) -> OLTRNetwork:
    """The stage's network as the loop builds it, centroids set (class means stand-in)."""
    torch.manual_seed(0)
    model_cfg = cfg["model"] | {"pretrained_path": None}
    net = create_network(model_cfg, size.classes, size.channels,
                         class_counts=train_counts(size.classes).tolist()).to(device)
    if cfg["train"]["channels_last"] and net.supports_channels_last:
        net = net.to(memory_format=torch.channels_last)
    if net.meta_embedding is not None:
        net.meta_embedding.init_centroids(torch.randn(size.classes, net.feature_dim,
                                                      device=device))
    return net


def training_unit(net: OLTRNetwork, cfg: dict[str, Any], batches: list[Any],
                  device: torch.device, *, amp: str, from_frozen: bool = False,
                  compiled: bool = False) -> Callable[[], Any]:
    """One pass of oltr's ``train_one_epoch`` over ``batches`` (SGD with the stage's groups)."""
    train_cfg = cfg["train"] | {"amp": amp, "log_every": 10**9}
    objective = Objective(train_cfg, train_counts(net.num_classes), net, device)
    task: nn.Module = TrainTask(net, objective, from_frozen=from_frozen)
    if compiled:
        task = torch.compile(task)
    optimizer = torch.optim.SGD(net.parameter_groups(train_cfg), lr=train_cfg["lr"],
                                momentum=train_cfg["momentum"],
                                weight_decay=train_cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        0, schedule="constant", total_steps=1, steps_per_epoch=1, step_size=1, gamma=1.0,
        warmup_steps=0))
    runtime = Runtime(device)
    channels_last = cfg["train"]["channels_last"] and net.supports_channels_last and not from_frozen
    return lambda: train_one_epoch(task, optimizer, scheduler, batches, runtime,
                                   train_cfg=train_cfg, steps=len(batches), stage="speed",
                                   use_channels_last=channels_last)


def precisions(device: torch.device) -> list[tuple[str, str]]:
    """(label, train.amp) of oltr's rows: the default, plus fp32 where the default is bf16."""
    if uses_bf16("auto", device):
        return [("bf16 autocast", "auto"), ("fp32", "off")]
    return [("fp32", "auto")]


def training_cases(size: Size, device: torch.device, steps: int, compile_rows: bool
                   ) -> list[Case]:
    cases = []
    batches = [_batch(size, size.batch, device, seed) for seed in range(steps)]
    for stage, label in (("stage1", "train stage 1"), ("stage2", "train stage 2")):
        cfg = stage_cfg(size, "oltr", stage)
        for precision, amp in precisions(device):
            net = build_net(cfg, size, device)
            cases.append(Case(label, size.name, size.batch, precision, steps * size.batch,
                              training_unit(net, cfg, batches, device, amp=amp),
                              group=f"{stage}-{size.name}-{amp}"))
        if compile_rows:
            net = build_net(cfg, size, device)
            cases.append(Case(label + " (train.compile)", size.name, size.batch,
                              precisions(device)[0][0], steps * size.batch,
                              training_unit(net, cfg, batches, device, amp="auto",
                                            compiled=True),
                              group=f"compile-{stage}-{size.name}"))
    return cases


def frozen_methods(size: Size) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(label, preset, stage, overrides) of the frozen-backbone stage-2 cases at ``size``: cRT
    (a linear classifier on the frozen backbone, class-aware batches: pooled rows) at both
    sizes — ImageNet-LT has no cRT preset, so there its plain preset with those two
    overrides —, and at ImageNet-LT size OLTR's stage 2 with a frozen backbone (Places-LT's
    protocol: modulated attention stays trainable, so its rows are feature maps)."""
    if size.name == "fmnist_lt":
        return [("crt", "crt", "stage2", ())]
    return [("oltr", "oltr", "stage2", ("stage2.train.freeze_backbone=true",)),
            ("crt", "plain", "main", ("train.freeze_backbone=true", "train.sampler=class_aware"))]


def frozen_cases(size: Size, device: torch.device, label: str, method: str, stage: str,
                 extra: tuple[str, ...]) -> list[Case]:
    """One frozen-backbone stage-2 epoch on images vs on cached rows, and the cache's pass."""
    cfg = stage_cfg(size, method, stage, *extra)
    batches = [_batch(size, size.batch, device, 100 + seed) for seed in range(size.cache_batches)]
    images = size.batch * size.cache_batches
    nets = {}
    for cached in (False, True):
        net = build_net(cfg, size, device)
        freeze_backbone(net, freeze_bn=True)
        nets[cached] = net
    reference = nets[True]

    @torch.no_grad()
    def compute_rows() -> list[tuple[torch.Tensor, torch.Tensor]]:
        reference.eval()
        rows = []
        for images_, labels in batches:
            if cfg["train"]["channels_last"] and reference.supports_channels_last:
                images_ = images_.contiguous(memory_format=torch.channels_last)
            rows.append((reference.frozen_features(images_).float().contiguous(), labels))
        return rows

    rows = compute_rows()
    nets[True].contiguous_after_split()  # as the loop does when it trains on cached rows
    kind = f"{label} stage 2, frozen backbone, {reference.frozen_split} rows"
    group = f"{size.name}-{label}"
    return [
        Case(f"frozen-backbone epoch on images ({kind})", size.name, size.batch, "fp32", images,
             training_unit(nets[False], cfg, batches, device, amp="off"),
             group=f"cache-{group}"),
        Case(f"frozen-backbone epoch on cached rows ({kind})", size.name, size.batch, "fp32",
             images, training_unit(nets[True], cfg, rows, device, amp="off", from_frozen=True),
             group=f"cache-{group}"),
        Case(f"feature cache: computing the rows once per weights ({kind})", size.name,
             size.batch, "fp32", images, compute_rows, group=f"cache-build-{group}"),
    ]


def backbone_case(size: Size, device: torch.device, steps: int) -> Case:
    """The least work of any training step that trains this backbone at this batch: the
    preset's backbone alone, forward + backward + SGD (momentum, weight decay), no head and no
    loss beyond a sum of its pooled features; fp32 and channels-last as oltr's own rows."""
    cfg = stage_cfg(size, "oltr", "stage1")
    net = build_net(cfg, size, device)
    backbone = net.backbone
    batches = [_batch(size, size.batch, device, seed) for seed in range(steps)]
    channels_last = cfg["train"]["channels_last"] and net.supports_channels_last
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def run() -> None:
        backbone.train()
        for images, _ in batches:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            backbone.forward_features(images).mean(dim=(2, 3)).sum().backward()
            optimizer.step()

    return Case("train step, backbone alone (forward + backward + SGD, no head)", size.name,
                size.batch, "fp32", steps * size.batch, run, group=f"backbone-{size.name}")


def inference_case(size: Size, device: torch.device, steps: int) -> Case:
    from oltr.inference import collect_outputs

    cfg = stage_cfg(size, "oltr", "stage2")
    net = build_net(cfg, size, device)
    batches = [_batch(size, size.eval_batch, device, 200 + seed) for seed in range(steps)]
    return Case("inference (stage-2 network)", size.name, size.eval_batch, "fp32",
                steps * size.eval_batch,
                lambda: collect_outputs(net, batches, device, amp="off",
                                        keys=("logits", "features")))


# --------------------------------------------------------------------------- the head
class NaiveHead(nn.Module):
    """The stage-2 head computed with B×K×d tensors, as the original code does: reachability
    γ = min_i ‖v − c_i‖ from ``norm(x_expand − centroids_expand)`` and a sort
    (MetaEmbeddingClassifier.py), the nearest-centroid loss from another expand-and-norm (its
    loss module sees only features and centroids). Shares the parameters of ``ours``."""

    def __init__(self, ours: OursHead) -> None:
        super().__init__()
        self.ours = ours

    def forward(self, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        memory, centroids = self.ours.memory, self.ours.memory.centroids
        batch, num_classes = v.shape[0], centroids.shape[0]
        x_expand = v.unsqueeze(1).expand(-1, num_classes, -1)
        c_expand = centroids.unsqueeze(0).expand(batch, -1, -1)
        distances = torch.norm(x_expand - c_expand, 2, 2)  # (B, K) through (B, K, d)
        gamma = torch.sort(distances, 1).values[:, 0]
        coefficients = memory.hallucinator(v).softmax(dim=1)
        selector = torch.tanh(memory.selector(v))
        meta = (memory.reachability_scale / gamma.clamp_min(memory.eps)).unsqueeze(1) * (
            v + selector * (coefficients @ centroids))
        loss_distances = torch.norm(v.unsqueeze(1).expand(-1, num_classes, -1)
                                    - centroids.unsqueeze(0).expand(batch, -1, -1), 2, 2)
        own = loss_distances.gather(1, labels.unsqueeze(1)).squeeze(1)
        others = loss_distances.scatter(1, labels.unsqueeze(1), float("inf")).min(dim=1).values
        centroid_loss = (own - others + self.ours.centroid.margin).clamp_min(0).mean()
        logits = self.ours.classifier(meta)
        return nn.functional.cross_entropy(logits, labels) + 0.1 * centroid_loss


class OursHead(nn.Module):
    """oltr's stage-2 head: `MetaEmbedding` (γ by ``torch.cdist``), `NearestCentroidLoss`
    (``torch.cdist``), the cosine classifier and cross-entropy; λ = 0.1."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.memory = MetaEmbedding(dim, classes)
        self.classifier = CosineClassifier(dim, classes)
        self.centroid = NearestCentroidLoss(margin=5.0)

    def forward(self, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        meta = self.memory(v)["meta"]
        logits = self.classifier(meta)
        return (nn.functional.cross_entropy(logits, labels)
                + 0.1 * self.centroid(v, labels, self.memory.centroids))


def head_cases(batch: int, classes: int, dim: int, device: torch.device, steps: int
               ) -> list[Case]:
    torch.manual_seed(0)
    ours = OursHead(dim, classes).to(device)
    with torch.no_grad():
        ours.memory.centroids.normal_()
    naive = NaiveHead(ours)
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(batch, dim, generator=generator).to(device).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    a, b = ours(v, labels), naive(v, labels)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise AssertionError(f"the naive head computes {float(b)}, oltr's {float(a)}")

    def unit(head: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            for _ in range(steps):
                ours.zero_grad(set_to_none=True)
                v.grad = None
                head(v, labels).backward()
        return run

    shape = f"B={batch}, K={classes}, d={dim}"
    return [Case(f"stage-2 head, oltr (B×K distances) [{shape}]", "head", batch, "fp32",
                 steps * batch, unit(ours), group="head"),
            Case(f"stage-2 head, B×K×d expand-and-norm [{shape}]", "head", batch, "fp32",
                 steps * batch, unit(naive), group="head")]


# --------------------------------------------------------------------------- the original
ORIGINAL_FILES = ("utils.py", "models/ResNet10Feature.py", "models/ResNetFeature.py",
                  "models/DotProductClassifier.py", "models/MetaEmbeddingClassifier.py",
                  "models/CosNormClassifier.py", "layers/ModulatedAttLayer.py",
                  "loss/DiscCentroidsLoss.py", "loss/SoftmaxLoss.py")
_ORIGINAL_PACKAGES = ("utils", "models", "layers", "loss")


def _on_device(method: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """``method`` with ``Tensor.cuda()`` meaning ``.to(device)`` while it runs."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor.to(device)  # type: ignore[method-assign]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # its deprecated addmm_ overload
                return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda  # type: ignore[method-assign]
    return wrapper


def import_original(path: Path, device: torch.device) -> dict[str, Any]:
    """The original's model and loss modules, imported from ``path`` (never copied nor
    edited). Its hard-coded ``.cuda()`` calls are made device-agnostic at import time by
    wrapping the two methods that hold them (``CosNorm_Classifier.__init__``,
    ``DiscCentroidsLoss.forward``) so that ``.cuda()`` means ``.to(device)`` inside them; the
    other two, in ``run_networks.py``'s class-mean initialisation, are not imported (that
    pass is not timed). Its top-level module names (``utils``, ``models``, …) are removed from
    ``sys.modules`` again afterwards."""
    path = Path(path).expanduser().resolve()
    missing = [name for name in ORIGINAL_FILES if not (path / name).is_file()]
    if missing:
        raise SystemExit(f"--original {path}: not a checkout of OpenLongTailRecognition-OLTR "
                         f"(missing {', '.join(missing[:3])})")
    saved = {name: module for name, module in sys.modules.items()
             if name.split(".")[0] in _ORIGINAL_PACKAGES}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            modules = {name: importlib.import_module(name) for name in (
                "models.ResNet10Feature", "models.DotProductClassifier",
                "models.MetaEmbeddingClassifier", "models.CosNormClassifier",
                "loss.DiscCentroidsLoss")}
    finally:
        sys.path.remove(str(path))
        for name in [n for n in sys.modules if n.split(".")[0] in _ORIGINAL_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)
    cosnorm = modules["models.CosNormClassifier"].CosNorm_Classifier
    cosnorm.__init__ = _on_device(cosnorm.__init__, device)
    loss = modules["loss.DiscCentroidsLoss"].DiscCentroidsLoss
    loss.forward = _on_device(loss.forward, device)
    return modules


def original_cases(path: Path, size: Size, device: torch.device, steps: int) -> list[Case]:
    """The original's stage-1 and stage-2 training steps at ``size`` (run_networks.py's
    batch_forward / batch_loss / batch_backward, without DataParallel: one device)."""
    modules = import_original(path, device)
    quiet = contextlib.redirect_stdout(io.StringIO())
    batches = [_batch(size, size.batch, device, seed) for seed in range(steps)]
    sgd = functools.partial(torch.optim.SGD, momentum=0.9, weight_decay=0.0005)
    torch.manual_seed(0)
    with quiet:
        # stage_1.py: ResNet-10 without attention or fc, a dot-product classifier, lr 0.1 both
        feat1 = modules["models.ResNet10Feature"].create_model(
            False, False, None, False, None, True).to(device)
        clf1 = modules["models.DotProductClassifier"].create_model(
            512, size.classes, False, None, True).to(device)
        # stage_2_meta_embedding.py: attention and fc_add; lr 0.01 / 0.1; centroids lr 0.01
        feat2 = modules["models.ResNet10Feature"].create_model(
            True, True, None, False, None, True).to(device)
        clf2 = modules["models.MetaEmbeddingClassifier"].create_model(
            512, size.classes, False, None, True).to(device)
        criterion = modules["loss.DiscCentroidsLoss"].create_loss(512, size.classes).to(device)
    opt1 = sgd([{"params": feat1.parameters(), "lr": 0.1}, {"params": clf1.parameters(),
                                                           "lr": 0.1}])
    opt2 = sgd([{"params": feat2.parameters(), "lr": 0.01},
                {"params": clf2.parameters(), "lr": 0.1}])
    opt_centroids = sgd(criterion.parameters(), lr=0.01)
    cross_entropy = nn.CrossEntropyLoss()

    def stage1() -> None:
        feat1.train(), clf1.train()
        for images, labels in batches:
            features, _ = feat1(images)
            logits, _ = clf1(features)
            loss = cross_entropy(logits, labels)
            opt1.zero_grad()
            loss.backward()
            opt1.step()
        float(loss)

    def stage2() -> None:
        feat2.train(), clf2.train()
        for images, labels in batches:
            features, _ = feat2(images)
            logits, _ = clf2(features, criterion.centroids.data)
            loss = cross_entropy(logits, labels) + 0.01 * criterion(features, labels)
            opt2.zero_grad()
            opt_centroids.zero_grad()
            loss.backward()
            opt2.step()
            opt_centroids.step()
        float(loss)

    return [Case("original: train stage 1", size.name, size.batch, "fp32", steps * size.batch,
                 stage1, group=f"stage1-{size.name}-original"),
            Case("original: train stage 2", size.name, size.batch, "fp32", steps * size.batch,
                 stage2, group=f"stage2-{size.name}-original")]


# --------------------------------------------------------------------------- the table
def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparisons the rows were measured for (speed ratio > 1: the first is faster)."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    out = []

    def add(what: str, faster: dict[str, Any], slower: dict[str, Any]) -> None:
        memory = (faster["peak_mib"] / slower["peak_mib"]
                  if faster["peak_mib"] and slower["peak_mib"] else None)
        out.append({"comparison": what, "speed_ratio": faster["per_second"] / slower["per_second"],
                    "memory_ratio": memory})

    if len(by_group.get("head", [])) == 2:
        ours, naive = by_group["head"]
        add("stage-2 head: oltr vs B×K×d expand-and-norm", ours, naive)
    for name, group in by_group.items():
        if name.startswith("cache-") and not name.startswith("cache-build") and len(group) == 2:
            method = name.split("-")[-1]
            add(f"frozen-backbone epoch, {group[0]['size']}, {method}: cached rows vs images",
                group[1], group[0])
    for name, group in by_group.items():
        if name.startswith("backbone-"):
            size = group[0]["size"]
            for ours in by_group.get(f"stage2-{size}-off", by_group.get(f"stage2-{size}-auto", [])):
                add(f"train stage 2, {size}: oltr ({ours['precision']}) vs the backbone alone "
                    "(what the rest of the step costs)", ours, group[0])
            for original in by_group.get(f"stage2-{size}-original", []):
                add(f"train stage 2, {size}: the backbone alone vs the original (the most any "
                    "step training this backbone can gain)", group[0], original)
    for stage in ("stage1", "stage2"):
        for group_name, group in by_group.items():
            if group_name.startswith(f"{stage}-") and group_name.endswith("-original"):
                size = group[0]["size"]
                for amp in ("auto", "off"):
                    for ours in by_group.get(f"{stage}-{size}-{amp}", []):
                        add(f"train {stage.replace('stage', 'stage ')}, {size}: oltr "
                            f"({ours['precision']}) vs the original (fp32)", ours, group[0])
        for group_name, group in by_group.items():
            if group_name.startswith(f"compile-{stage}-"):
                size = group[0]["size"]
                eager = by_group.get(f"{stage}-{size}-auto", [])
                if eager:
                    add(f"train {stage.replace('stage', 'stage ')}, {size}: train.compile vs "
                        "eager", group[0], eager[0])
    return out


def format_table(result: dict[str, Any]) -> str:
    """The result as one Markdown table of rows and one of ratios."""
    lines = [f"Machine: {result['machine']}  ", f"Device: {result['device']}; median of "
             f"{result['repeats']} interleaved repetitions of {result['steps']} steps after "
             f"{result['warmup']} warm-up; synthetic data on the device"
             + ("; --quick (smoke sizes)" if result["quick"] else ""), "",
             "| case | size | batch | precision | img/s (median) | min–max | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        peak = f"{row['peak_mib']:.1f}" if row["peak_mib"] is not None else "n/a"
        lines.append(f"| {row['case']} | {row['size']} | {row['batch']} | {row['precision']} | "
                     f"{row['per_second']:.1f} | {row['min']:.1f}–{row['max']:.1f} | {peak} |")
    if result["ratios"]:
        lines += ["", ("| comparison (A vs B) | speed ratio (A ÷ B, img/s) | peak-memory ratio "
                       "(A ÷ B) |"), "| --- | --- | --- |"]
        for ratio in result["ratios"]:
            memory = f"{ratio['memory_ratio']:.3f}" if ratio["memory_ratio"] else "n/a"
            lines.append(f"| {ratio['comparison']} | {ratio['speed_ratio']:.2f}× | {memory} |")
    return "\n".join(lines) + "\n"


def interleaved(cases: list[Case], device: torch.device, *, warmup: int, repeats: int,
                log: Callable[[str], None]) -> None:
    """Warm every case up, time each once per repetition (cases interleaved), then measure
    each one's peak memory in one more unit (on the CPU with malloc returning freed blocks,
    :func:`return_freed_memory`, which costs page faults: so never while timing)."""
    for case in cases:
        log(f"warm-up: {case.name} [{case.size}]")
        for _ in range(warmup):
            case.run()
    synchronize(device)
    for repeat in range(repeats):
        log(f"repetition {repeat + 1}/{repeats}")
        for case in cases:
            case.measure_time(device)
    log("peak memory")
    if device.type == "cpu":
        return_freed_memory()
    for case in cases:
        case.measure_memory(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="smoke sizes, one repetition")
    parser.add_argument("--original", type=Path, metavar="PATH",
                        help="a checkout of zhmiao/OpenLongTailRecognition-OLTR to time too")
    parser.add_argument("--compile", action="store_true", help="add train.compile rows")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (quick: 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per measured unit (default: GPU 20, CPU 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up units (default 2)")
    parser.add_argument("--sizes", nargs="+", choices=("imagenet_lt", "fmnist_lt"),
                        default=["imagenet_lt", "fmnist_lt"], help="benchmark sizes to run")
    parser.add_argument("--batch", type=int, default=None,
                        help="training batch of every size (default: the table's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    device = torch.device(args.device)
    quick = args.quick
    repeats = args.repeats or (1 if quick else 5)
    steps = args.steps or (1 if quick else (20 if device.type == "cuda" else 3))
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def log(message: str) -> None:
        print(f"[speed] {message}", file=sys.stderr, flush=True)

    cases: list[Case] = []
    for size in (s for s in sizes(device, quick) if s.name in args.sizes):
        if args.batch:
            size = dataclasses.replace(size, batch=args.batch)
        log(f"building {size.name} cases")
        cases += training_cases(size, device, steps, args.compile)
        if args.original is not None and size.name == "imagenet_lt":
            cases += original_cases(args.original, size, device, steps)
        cases.append(backbone_case(size, device, steps))
        for label, method, stage, extra in frozen_methods(size):
            cases += frozen_cases(size, device, label, method, stage, extra)
        cases.append(inference_case(size, device, steps))
    cases += head_cases(*((16, 100, 64) if quick else (128, 1000, 512)), device,
                        steps=5 if quick else 20)
    interleaved(cases, device, warmup=warmup, repeats=repeats, log=log)
    rows = [case.row() for case in cases]
    result = {"machine": machine_description(), "device": str(device), "quick": quick,
              "repeats": repeats, "steps": steps, "warmup": warmup,
              "original": str(args.original) if args.original else None,
              "rows": rows, "ratios": ratios(rows)}
    table = format_table(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"speed-{device.type}{'-quick' if quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    log(f"wrote {args.out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
