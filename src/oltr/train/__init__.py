"""Training one stage: data loaders built once per stage, the objective, checkpoints, a stage's
parts (`oltr.train.stage`) and the one loop every method shares (`oltr.train.loop`). A run of
stages, and the decision rule fitted at its end, is `oltr.pipeline`'s; the device and ranks are
`oltr.runtime`'s."""
from __future__ import annotations

from oltr.train.loop import StageResult, fit, train_one_epoch, validate
from oltr.train.stage import (
    StageParts,
    build_stage,
    check_stage,
    init_weights_path,
    lr_factor,
    steps_per_epoch,
)

__all__ = ["StageParts", "StageResult", "build_stage", "check_stage", "fit", "init_weights_path",
           "lr_factor", "steps_per_epoch", "train_one_epoch", "validate"]
