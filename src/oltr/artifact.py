"""The trained artifact of a run: the final stage's weights, ``model.json`` and the decision rule
fitted for them (`oltr.decision`), saved in the run (``RUN/decision.json``).

:func:`fit_decision` is what ``oltr train`` calls when a run's last stage is done: it runs the
selected weights once over the splits the rule is chosen on (val, val_open where the benchmark
has it, and train for open scores that learn), fits every ``eval`` choice on them and saves the
rule beside the weights with the sha256 of the weights it belongs to. A stage trained with a
frozen-backbone feature cache (``train.feature_cache: on``) is fitted from its cached val and
train rows (`oltr.features`): the backbone does not run over them again. Evaluation, ``oltr
predict`` and ``oltr export`` all apply that one rule; :func:`saved_rule` gives it back only
while it still belongs to the weights on disk.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oltr.data import Benchmark, dataset_for, load_benchmark
from oltr.decision import (
    AUTO_OPEN_SCORES,
    DECISION_JSON,
    DEFAULT_OPEN_SCORE,
    DecisionRule,
    ForeignTensorsError,
    fit_decision_rule,
)
from oltr.detectors import create_detector
from oltr.detectors.head import network_head
from oltr.errors import InputError
from oltr.features import FeatureStore, find_stores, store_outputs
from oltr.inference import forward_split, load_model, split_outputs
from oltr.models import OLTRNetwork
from oltr.run import RunDir
from oltr.runtime import Runtime, init_runtime


def rule_needs_train(eval_cfg: Mapping[str, Any]) -> bool:
    """Whether fitting the rule of ``eval_cfg`` needs the train split's outputs (an open score
    that learns from them, or ``auto``, whose candidates include such scores)."""
    name = eval_cfg["open_score"]
    if name == "auto":
        return True
    return bool(create_detector(name, **(eval_cfg.get("open_score_options") or {})).fit_inputs)


def check_benchmark_fits(bench: Benchmark, info: Mapping[str, Any], data_dir: str | Path) -> None:
    """InputError unless ``bench`` has the classes the model was trained on."""
    if bench.num_classes != info["num_classes"]:
        raise InputError(f"the model was trained on {info['num_classes']} classes but the data "
                         f"has {bench.num_classes}", path=Path(data_dir))
    if bench.class_names != info["class_names"]:
        raise InputError(f"the model was trained on the classes {info['class_names'][:5]} but "
                         f"the data has {bench.class_names[:5]}", path=Path(data_dir))
    trained = info.get("train_counts")
    skipped = (info.get("skipped_images") or {}).get("train", 0)
    if isinstance(trained, list) and not skipped and trained != bench.train_counts.tolist():
        first = next(k for k, (a, b) in enumerate(zip(trained, bench.train_counts.tolist()))
                     if a != b)
        warnings.warn(
            f"{data_dir}: its train split is not the one the model trained on (class "
            f"{bench.class_names[first]!r}: {int(bench.train_counts[first])} train images here, "
            f"{trained[first]} in training); the shot groups and the detectors fitted on train "
            "use this one", UserWarning, stacklevel=2)


def forward_splits(net: OLTRNetwork, bench: Benchmark, stage_cfg: dict[str, Any],
                   splits: list[str], runtime: Runtime, *, keys: tuple[str, ...] = (
                       "logits", "features", "reachability"),
                   stores: Mapping[str, FeatureStore] | None = None
                   ) -> dict[str, dict[str, np.ndarray]]:
    """One forward pass of ``net`` over each split of ``bench`` (each rank its shard); a split
    with a frozen-backbone feature cache in ``stores`` runs from its rows instead."""
    outputs = {}
    for split in splits:
        if stores and split in stores:
            outputs[split] = store_outputs(net, stores[split], stage_cfg, runtime, keys=keys,
                                           description=split if runtime.is_primary else None)
            continue
        outputs[split] = forward_split(
            net, dataset_for(bench, split, stage_cfg["data"], train=False), stage_cfg,
            runtime=runtime, keys=keys, description=split if runtime.is_primary else None)
    return outputs


def classifier_of(net: OLTRNetwork) -> torch.nn.Module | None:
    """The linear classifier τ-normalisation rescales (None for heads it does not apply to)."""
    return net.direct_classifier()


def memory_of(net: OLTRNetwork) -> torch.Tensor | None:
    """An OLTR model's centroids (K, d), float32 on the CPU; None without a memory."""
    centroids = net.centroids
    return None if centroids is None else centroids.detach().float().cpu()


def fit_rule(net: OLTRNetwork, info: Mapping[str, Any], eval_cfg: Mapping[str, Any],
             outputs: Mapping[str, Mapping[str, np.ndarray]], *, open_set: bool = True
             ) -> DecisionRule:
    """The decision rule of ``eval_cfg`` fitted on the stored ``outputs`` (val, val_open,
    train) of ``net``, recording the weights it belongs to."""
    split_views = {name: split_outputs(dict(values)) for name, values in outputs.items()
                   if name in ("train", "val", "val_open")}
    return fit_decision_rule(
        eval_cfg, split_views, class_names=info["class_names"],
        train_counts=np.asarray(info["train_counts"]), classifier=classifier_of(net),
        head=network_head(net.eval()), open_set=open_set, centroids=memory_of(net),
        record={"weights": {"stage": info["stage"], "epoch": info.get("epoch"),
                            "sha256": info["weights_sha256"]},
                "eval": rule_settings(eval_cfg)})


#: The ``eval`` settings a decision rule is fitted from (recorded with it).
RULE_SETTINGS = ("select", "open_score", "open_score_options", "open_score_candidates",
                 "threshold", "accept_rate", "logit_adjustment", "tau_normalization",
                 "open_score_logits")


def rule_settings(eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {key: eval_cfg.get(key) for key in RULE_SETTINGS}


def saved_rule(directory: Path, info: Mapping[str, Any],
               eval_cfg: Mapping[str, Any] | None = None, *,
               refuse_stale: bool = True) -> DecisionRule | None:
    """The rule saved in ``directory`` (a run's, or an artifact folder's), or None when there
    is none (or, given
    ``eval_cfg``, when it was fitted from other ``eval`` settings — a stage shared by several
    methods in ``oltr bench``, or an edited config). A rule fitted for other weights (the
    stage trained again after it) is an InputError (``refuse_stale``: prediction must not use
    it) or None (evaluation fits it anew)."""
    directory = Path(directory)
    if not (directory / DECISION_JSON).exists():
        return None
    try:
        rule = DecisionRule.load(directory)
    except ForeignTensorsError as exc:
        if refuse_stale:
            raise
        print(f"note: {exc}; fitting the rule anew", file=sys.stderr)
        return None
    if eval_cfg is not None and rule.record.get("eval") != rule_settings(eval_cfg):
        return None
    fitted_for = (rule.record.get("weights") or {}).get("sha256")
    if fitted_for != info["weights_sha256"]:
        if not refuse_stale:
            return None
        raise InputError("the decision rule was fitted for other weights (the stage was trained "
                         "again after it); re-run `oltr evaluate RUN --data DIR` to fit it anew",
                         path=directory / DECISION_JSON)
    return rule


def fit_decision(run_dir: str | Path | RunDir, data_dir: str | Path, *,
                 runtime: Runtime | None = None, verbose: bool = True) -> DecisionRule:
    """Fit the decision rule of a trained run's final stage on val and save it in the run
    (``RUN/decision.json``; rank 0 writes, every rank passes its shard of each split). The
    rule belongs to the run, not to the stage folder: stages shared by several methods
    (``oltr bench``) keep one set of weights but each run its own rule. ``verbose``: print the
    fitted rule in one line."""
    run = RunDir.of(run_dir)
    stage_cfg = run.stage_config()
    runtime = runtime or init_runtime(stage_cfg["device"])
    stage_dir = run.final_stage().path
    net, info = load_model(stage_dir, runtime.device)
    bench = load_benchmark(data_dir, image_root=stage_cfg["data"]["image_root"],
                           allow_outside_root=stage_cfg["data"]["allow_outside_root"])
    check_benchmark_fits(bench, info, data_dir)
    eval_cfg = stage_cfg["eval"]
    splits = ["val", *(["val_open"] if bench.has_split("val_open") else []),
              *(["train"] if rule_needs_train(eval_cfg) else [])]
    if stage_cfg["data"]["skip_bad_images"]:  # as the training did (counted there)
        bench.drop_unreadable_images(tuple(splits), num_workers=stage_cfg["data"]["num_workers"])
    stores = (find_stores(stage_dir, net, bench, stage_cfg, splits, runtime.device)
              if stage_cfg["train"]["feature_cache"] == "on" else None)
    outputs = forward_splits(net, bench, stage_cfg, splits, runtime, keys=("logits", "features"),
                             stores=stores)
    rule = fit_rule(net, info, eval_cfg, outputs)
    if runtime.is_primary:
        rule.save(run.path)
    if runtime.is_primary and verbose:
        source = rule.record["open_score"]["source"]
        print(f"decision rule: τ-norm {rule.tau_normalization:g}, logit adjustment "
              f"{rule.logit_adjustment:g}, open score {rule.open_score} ({source}), threshold "
              f"{rule.threshold:.4g}; saved to {run.decision_path}", flush=True)
    runtime.barrier()
    return rule


__all__ = ["AUTO_OPEN_SCORES", "DEFAULT_OPEN_SCORE", "check_benchmark_fits", "classifier_of",
           "fit_decision", "fit_rule", "forward_splits", "rule_needs_train", "saved_rule"]
