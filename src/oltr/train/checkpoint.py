"""Training checkpoints and selected weights: unwrapped from DDP / ``torch.compile``, written by
the primary rank only (timm's ``unwrap_model``, torchvision's ``save_on_master``).

The checkpoint (``checkpoint.pt``, every epoch) holds the model (BatchNorm statistics and the
memory's centroids included), the optimiser and scheduler states, the epoch and the best-so-far
record; it is read with ``weights_only=True``, so loading never runs code from the file. The
selected weights are safetensors (no pickle at all) beside ``model.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from oltr.errors import InputError
from oltr.io import atomic_write
from oltr.run import WEIGHTS, write_model_info

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
    atomic_write(stage_dir / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    write_model_info(stage_dir, info)
