"""The one training loop shared by every method (a method is a config, never a copy of this file).

One *stage* = build data and network from a flat config (`oltr.train.stage.build_stage`),
optionally start from a previous stage's weights (OLTR stage 2 loads stage 1, paper §3.3), then
:func:`fit`: train with SGD, validate every epoch, write a checkpoint every epoch atomically,
keep the best-on-val weights (`oltr.train.checkpoint`). A *run* is a sequence of stages
(``configs/<benchmark>/<method>.yaml``) followed by the fit of the decision rule
(`oltr.pipeline.train_run`). A killed run continues with
``resume=True`` from the last completed epoch: every random draw derives from
``(seed, epoch[, position])``, so with ``deterministic: true`` a resumed run ends with the same
weights as an uninterrupted one.

Distributed: under ``torchrun`` every process runs this loop on its share of each batch
(`oltr.train.loaders`), the network and its objective are wrapped in DDP (optionally with
SyncBatchNorm), validation and centroid initialisation gather every rank's outputs, and only
rank 0 writes files (torchvision's ``references/classification`` is the shape followed: builders
in `oltr.train.stage`, one screen of loop here).

A stage with a frozen backbone and ``train.feature_cache: on`` computes the backbone's outputs
once (`oltr.features`) and trains, validates and initialises its memory from them; with
``train.compile`` the training task runs through ``torch.compile`` (docs/speed.md).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from oltr import metrics
from oltr.errors import OltrError
from oltr.features import FeatureStore, store_outputs
from oltr.inference import forward_split
from oltr.models import OLTRNetwork
from oltr.pause import pause_point
from oltr.runtime import Runtime, autocast, epoch_seed
from oltr.train.checkpoint import save_epoch
from oltr.train.stage import StageParts


# --------------------------------------------------------------------------- one stage
@dataclass
class StageResult:
    """What :func:`fit` reports of a stage: its folder, the best epoch (1-based; -1 when none
    ran) and its val accuracy, the epochs run now, the seconds since building began and the
    unreadable images skipped per split."""

    stage_dir: Path
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    seconds: float
    skipped_images: dict[str, int] = field(default_factory=dict)


def fit(parts: StageParts, *, progress: bool = True, verbose: bool = True,
        tensorboard: Any = None) -> StageResult:
    """Train the epochs of a built stage (`oltr.train.stage.build_stage`) left to do: each
    epoch seeds from ``(seed, epoch)``, trains (:func:`train_one_epoch`), validates
    (:func:`validate`, which selects the best epoch) and, on the primary rank, writes the
    selected weights, the history and the checkpoint (`oltr.train.checkpoint.save_epoch`).
    ``progress``: a tqdm bar over the steps; ``verbose``: a line per epoch on standard output;
    ``tensorboard``: a ``SummaryWriter`` (rank 0) for per-step and per-epoch scalars.

    Raises:
        OltrError: a non-finite training loss (``train.nonfinite``); the last checkpoint stays.
    """
    cfg, runtime, steps = parts.cfg, parts.runtime, parts.steps
    stage, epochs = cfg["stage"], cfg["train"]["epochs"]
    talk = runtime.is_primary and verbose
    if talk and parts.start_epoch < epochs:
        print(f"[{stage}] training epochs {parts.start_epoch + 1}..{epochs} ({steps} steps "
              f"each, {runtime.world_size} process{'es' if runtime.distributed else ''} on "
              f"{runtime.device.type}) into {parts.stage_dir}", flush=True)
    log = scalar_logger(tensorboard, stage)
    bar = None
    if progress and runtime.is_primary and parts.start_epoch < epochs:
        bar = tqdm(total=(epochs - parts.start_epoch) * steps, desc=f"[{stage}]", unit="step",
                   leave=False, dynamic_ncols=True, disable=None)
    with bar if bar is not None else nullcontext():
        for epoch in range(parts.start_epoch, epochs):
            torch.manual_seed(epoch_seed(cfg["seed"], epoch) + runtime.rank)
            epoch_start = time.perf_counter()
            parts.objective.set_epoch(epoch)
            parts.loader.set_epoch(epoch)
            stats = train_one_epoch(parts.task, parts.optimizer, parts.scheduler, parts.loader,
                                    runtime, train_cfg=cfg["train"], steps=steps, stage=stage,
                                    use_channels_last=parts.channels_last, progress=bar,
                                    log=log, global_step=epoch * steps).reduced(runtime)
            train_seconds = time.perf_counter() - epoch_start
            val = validate(parts.net, parts.val_batches, cfg, runtime, parts.bench.train_counts,
                           store=parts.stores.val if parts.stores is not None else None)
            record = epoch_record(epoch, stats, val, parts.optimizer.param_groups[-1]["lr"],
                                  train_seconds, epoch_start)
            parts.history.append(record)
            improved = parts.best.update(epoch + 1, val["accuracy"])
            if runtime.is_primary:
                save_epoch(parts.stage_dir, parts.checkpoint_path, epoch=epoch + 1,
                           improved=improved, best=parts.best, history=parts.history, cfg=cfg,
                           class_names=parts.bench.class_names, model_info=parts.model_info,
                           net=parts.net, optimizer=parts.optimizer, scheduler=parts.scheduler)
                if log is not None:
                    log((epoch + 1) * steps, {f"epoch/{k}": v for k, v in record.items() if
                                              isinstance(v, (int, float)) and k != "epoch"})
                if talk:
                    message = epoch_message(stage, epochs, record, improved)
                    (bar.write(message) if bar is not None else print(message, flush=True))
            runtime.barrier()
    return StageResult(parts.stage_dir, parts.best.epoch, parts.best.accuracy,
                       epochs - parts.start_epoch, time.perf_counter() - parts.started,
                       parts.skipped_images)


def scalar_logger(tensorboard: Any, stage: str) -> Callable[[int, dict[str, float]], None] | None:
    """``log(step, scalars)`` writing ``<stage>/<name>`` scalars to a TensorBoard
    ``SummaryWriter``; None without one."""
    if tensorboard is None:
        return None

    def log(step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            tensorboard.add_scalar(f"{stage}/{name}", value, step)
    return log


def epoch_record(epoch: int, stats: EpochTotals, val: dict[str, float | None], lr: float,
                 train_seconds: float, epoch_start: float) -> dict[str, Any]:
    """The ``history.jsonl`` line of 0-based ``epoch``: its training means over every rank,
    its val accuracy (overall and many/medium/few-shot), the head group's learning rate, the
    training throughput and the seconds since ``epoch_start`` (``time.perf_counter()``)."""
    seen = max(1.0, stats.seen)
    return {
        "epoch": epoch + 1,
        "train_loss": stats.loss_sum / seen,
        "train_loss_parts": stats.parts,
        "train_accuracy": stats.correct / seen,
        "val_accuracy": val["accuracy"],
        "val_many": val["many"], "val_medium": val["medium"], "val_few": val["few"],
        "lr": lr,
        "images_per_second": stats.seen / train_seconds,
        "seconds": time.perf_counter() - epoch_start,
        "skipped_steps": int(stats.skipped),
    }


def epoch_message(stage: str, epochs: int, record: dict[str, Any], improved: bool) -> str:
    """The line an epoch prints: loss, train and val accuracy (``*``: the new best), speed and
    skipped non-finite steps."""
    skipped = record["skipped_steps"]
    return (f"[{stage}] epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.3f}  val acc {record['val_accuracy']:.3f}"
            f"{' *' if improved else ''}  {record['images_per_second']:.0f} img/s"
            f"{f'  ({skipped} non-finite steps skipped)' if skipped else ''}")


# --------------------------------------------------------------------------- one epoch
@dataclass
class EpochStats:
    """What one epoch of training measured on this process (sums over its steps)."""

    loss_sum: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    correct: int = 0
    seen: int = 0
    skipped: int = 0

    def reduced(self, runtime: Runtime) -> EpochTotals:
        """The sums over every rank (one all-reduce), the loss parts as means per image."""
        totals = runtime.all_reduce_sum([self.loss_sum, self.correct, self.seen, self.skipped,
                                         *self.parts.values()])
        loss_sum, correct, seen, skipped = (float(x) for x in totals[:4])
        parts = dict(zip(self.parts, (float(x) / max(1.0, seen) for x in totals[4:])))
        return EpochTotals(loss_sum, correct, seen, skipped, parts)


@dataclass
class EpochTotals:
    """One epoch's sums over every rank (:meth:`EpochStats.reduced`): the loss sum, correct
    predictions, images seen and steps skipped, and each loss part's mean per image."""

    loss_sum: float
    correct: float
    seen: float
    skipped: float
    parts: dict[str, float]


def _nonfinite(stage: str, value: float) -> OltrError:
    return OltrError(f"non-finite training loss ({value}) in stage '{stage}'; the last good "
                     "checkpoint is kept. Lower train.lr, set train.grad_clip, or set "
                     "train.nonfinite=skip to skip such steps.")


def train_one_epoch(
    task: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Any,
    runtime: Runtime,
    *,
    train_cfg: dict[str, Any],
    steps: int,
    stage: str,
    use_channels_last: bool,
    progress: Any = None,
    log: Any = None,
    global_step: int = 0,
) -> EpochStats:
    """One epoch of SGD over ``steps`` batches of ``loader`` (torchvision's
    ``train_one_epoch``): ``task(images, labels)`` → (loss parts, logits). Sums stay on the
    device (no per-step synchronisation) except where a step must be inspected: a non-finite
    loss skips the step (``train.nonfinite: skip``, counted; checked every step) or stops the
    run (``stop``, checked at every log interval and at the epoch's end, before anything is
    saved: the last checkpoint is kept). ``progress``: a tqdm bar to advance;
    ``log(step, scalars)``: per-step scalars (TensorBoard)."""
    stats = EpochStats()
    task.train()
    device = runtime.device
    skip = train_cfg["nonfinite"] == "skip"
    log_every = max(1, train_cfg["log_every"])
    zero = torch.zeros((), device=device, dtype=torch.float64)
    loss_sum, correct, finite = zero.clone(), zero.clone(), torch.ones((), device=device,
                                                                        dtype=torch.bool)
    part_sums: dict[str, torch.Tensor] = {}
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        pause_point("train:step")
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if use_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(train_cfg["amp"], device):
            parts, logits = task(images, labels)
        loss = parts["loss"].detach()
        if skip and not bool(torch.isfinite(loss)):
            stats.skipped += 1  # no optimiser (nor scheduler) step
            continue
        finite &= torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if train_cfg["grad_clip"]:
            nn.utils.clip_grad_norm_(task.parameters(), train_cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        batch = labels.numel()
        loss_sum += loss.double() * batch
        for name, value in parts.items():
            if name != "loss":
                part_sums[name] = part_sums.get(name, zero) + value.detach().double() * batch
        correct += (logits.detach().argmax(1) == labels).sum()
        stats.seen += batch
        if (step + 1) % log_every == 0:
            if not bool(finite):
                raise _nonfinite(stage, float(loss))
            if progress is not None:
                progress.set_postfix(loss=f"{float(loss_sum) / stats.seen:.3f}",
                                     acc=f"{float(correct) / stats.seen:.3f}", refresh=False)
            if log is not None:
                log(global_step + step + 1, {f"step/{k}": float(v.detach())
                                             for k, v in parts.items()}
                    | {"step/lr": optimizer.param_groups[-1]["lr"]})
        if progress is not None:
            progress.update(1)
    if not bool(finite):
        raise _nonfinite(stage, float("nan"))
    if stats.seen == 0 and stats.skipped:
        raise OltrError(f"every step of an epoch had a non-finite loss in stage '{stage}'; "
                        "lower train.lr")
    stats.loss_sum, stats.correct = float(loss_sum), int(correct)
    stats.parts = {name: float(value) for name, value in part_sums.items()}
    return stats


def validate(net: OLTRNetwork, batches: Any, cfg: dict[str, Any], runtime: Runtime,
             train_counts: np.ndarray, *, store: FeatureStore | None = None
             ) -> dict[str, float | None]:
    """Val accuracy of ``net`` (what selects the best epoch) and its many/medium/few-shot
    means; every rank passes its shard and the outputs are gathered, so all ranks agree.
    ``store``: the val split's frozen-backbone cache, read instead of ``batches``."""
    if store is not None:
        outputs = store_outputs(net, store, cfg, runtime, keys=("logits",))
    else:
        outputs = forward_split(net, batches, cfg, runtime=runtime, keys=("logits",))
    predictions = outputs["logits"].argmax(1)
    groups = metrics.closed_set_accuracy(
        predictions, outputs["labels"], train_counts, many_threshold=cfg["eval"]["many_threshold"],
        few_threshold=cfg["eval"]["few_threshold"], strict=cfg["eval"]["strict_shots"])
    return {"accuracy": float((predictions == outputs["labels"]).mean()),
            "many": groups["many"], "medium": groups["medium"], "few": groups["few"]}
