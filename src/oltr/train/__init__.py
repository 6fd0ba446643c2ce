"""Training: the runtime (device, DDP ranks from torchrun), data loaders built once per stage,
the objective, checkpoints, a stage's parts (`oltr.train.stage`) and the one loop every method
shares (`oltr.train.loop`).

The names below are imported on first use (PEP 562), so that the lower layers
(``oltr.inference`` reads ``oltr.train.runtime`` and ``oltr.train.augment``) can import this
package's leaf modules without importing the loop, which imports them.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_MODULE_OF = {
    "StageResult": "loop", "check_run": "loop", "fit": "loop", "train_one_epoch": "loop",
    "train_run": "loop", "validate": "loop",
    "StageParts": "stage", "build_stage": "stage", "check_stage": "stage", "lr_factor": "stage",
    "steps_per_epoch": "stage",
    "Runtime": "runtime", "init_runtime": "runtime", "select_device": "runtime",
}
__all__ = ["Runtime", "StageParts", "StageResult", "build_stage", "check_run", "check_stage",
           "fit", "init_runtime", "lr_factor", "select_device", "steps_per_epoch",
           "train_one_epoch", "train_run", "validate"]


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(import_module(f"oltr.train.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'oltr.train' has no attribute {name!r}")
