"""Training: the runtime (device, DDP ranks from torchrun), data loaders built once per stage,
the objective, checkpoints, and the one loop every method shares.

The loop's names are imported on first use (PEP 562), so that the lower layers
(``oltr.inference`` reads ``oltr.train.runtime`` and ``oltr.train.augment``) can import this
package's leaf modules without importing the loop, which imports them.
"""
from __future__ import annotations

from typing import Any

_LOOP_NAMES = ("StageResult", "calibrate_reachability_scale", "check_run", "check_stage",
               "lr_factor", "parameter_groups", "steps_per_epoch", "train_run", "train_stage")
_RUNTIME_NAMES = ("Runtime", "init_runtime", "select_device")
__all__ = ["Runtime", "StageResult", "calibrate_reachability_scale", "check_run", "check_stage",
           "init_runtime", "lr_factor", "parameter_groups", "select_device", "steps_per_epoch",
           "train_run", "train_stage"]


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        from oltr.train import loop

        return getattr(loop, name)
    if name in _RUNTIME_NAMES:
        from oltr.train import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'oltr.train' has no attribute {name!r}")
