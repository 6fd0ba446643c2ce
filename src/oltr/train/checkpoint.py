"""Training checkpoints and selected weights: unwrapped from DDP / ``torch.compile``, written by
the primary rank only (timm's ``unwrap_model``, torchvision's ``save_on_master``).

The checkpoint (``checkpoint.pt``, every epoch) holds the model (BatchNorm statistics and the
memory's centroids included), the optimiser and scheduler states, the epoch and the best-so-far
record; it is read with ``weights_only=True``, so loading never runs code from the file. The
selected weights are safetensors (no pickle at all) beside ``model.json``.

A stage's files per finished epoch (:func:`save_epoch`): the selected weights when val accuracy
improved (:class:`BestEpoch`), ``history.jsonl``, then the checkpoint; a resumed stage starts
from the checkpoint after checking it belongs to the same config and classes
(:func:`restore_checkpoint`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from oltr.config import config_differences, with_defaults
from oltr.errors import InputError
from oltr.io import atomic_write
from oltr.run import StageDir

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "epoch", "best_epoch", "best_acc")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, however nested."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) atomically."""
    atomic_write(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint without executing code from it (``weights_only=True``);
    InputError naming the file when it is not an oltr checkpoint, truncated or tampered with."""
    try:
        empty = Path(path).stat().st_size == 0
    except OSError:
        empty = False  # torch.load names the reason
    if empty:  # torch.load's own message then is a bare "EOF" or nothing at all
        raise InputError(f"{Path(path).name} is empty (0 bytes): the run was interrupted while "
                         "saving it (or the file was copied from a full disk); remove it and "
                         "rerun with --resume to train this stage again from its start, or "
                         "train into a new --out", path=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"refusing or unable to read checkpoint: {exc}", path=path) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError("not an oltr training checkpoint (wrong format tag)", path=path)
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise InputError(f"checkpoint lacks keys {missing} (tampered or truncated)", path=path)
    return state


def save_model(stage_dir: Path, net: nn.Module, info: dict[str, Any]) -> None:
    """The selected weights as safetensors (no pickle) + ``model.json``, the JSON that
    rebuilds the network (of the unwrapped module)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(net).state_dict().items()}
    StageDir(stage_dir).write_model(lambda tmp: save_file(tensors, str(tmp)), info)


@dataclass
class BestEpoch:
    """The best-on-val epoch so far (1-based; -1 and accuracy -1.0 before the first)."""

    epoch: int = -1
    accuracy: float = -1.0

    def update(self, epoch: int, accuracy: float) -> bool:
        """Record 1-based ``epoch`` if its val ``accuracy`` is strictly higher than the best so
        far (ties keep the earlier epoch); returns whether it is the new best."""
        improved = accuracy > self.accuracy
        if improved:
            self.epoch, self.accuracy = epoch, float(accuracy)
        return improved


def restore_checkpoint(state: dict[str, Any], path: Path, *, cfg: dict[str, Any],
                       class_names: Sequence[str], net: nn.Module,
                       optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, BestEpoch]:
    """Load a stage's checkpoint ``state`` (read from ``path`` by :func:`load_checkpoint`) into
    ``net``, ``optimizer`` and ``scheduler``; returns the epochs done and the best epoch.

    Raises:
        InputError: naming ``path``, when the checkpoint was written with another config,
            for other classes, or does not fit the model (tampered, other data).
    """
    if with_defaults(state["config"]) != cfg:
        raise InputError(
            "the checkpoint was written with a different config ("
            f"{config_differences(with_defaults(state['config']), cfg)}); resume with the "
            "same command, or start a new --out", path=path)
    if state.get("class_names", class_names) != class_names:
        raise InputError(
            f"the checkpoint was written for {len(state['class_names'])} classes "
            f"{state['class_names'][:5]} but the data has {len(class_names)} "
            f"{class_names[:5]}; resume with the same --data", path=path)
    try:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InputError(
            "the checkpoint does not fit this model and data (tampered, or other data?): "
            f"{str(exc).strip().splitlines()[-1].strip()}", path=path) from None
    return state["epoch"], BestEpoch(state["best_epoch"], state["best_acc"])


def save_epoch(stage_dir: Path, path: Path, *, epoch: int, improved: bool, best: BestEpoch,
               history: list[dict[str, Any]], cfg: dict[str, Any], class_names: Sequence[str],
               model_info: dict[str, Any], net: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The files of finished 1-based ``epoch`` (primary rank only), in this order: the selected
    weights (:func:`save_model`, with ``model_info``) when it ``improved``, the history up to
    it, and the checkpoint at ``path`` — so a checkpoint never names weights not yet written."""
    if improved:
        save_model(stage_dir, net, model_info | {"epoch": epoch, "val_accuracy": best.accuracy})
    StageDir(stage_dir).write_history(history)
    save_checkpoint(path, {
        "config": cfg, "model": unwrap_model(net).state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "best_epoch": best.epoch, "best_acc": best.accuracy,
        "class_names": class_names,
    })
