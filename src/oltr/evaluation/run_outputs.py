"""One forward pass per split of a trained run, with its decision rule applied: the stored outputs
every evaluation reads (the report, the detector sweep, the Fig. 8 curves, the report page).

The rule is the one saved beside the weights (`oltr.decision`), or one fitted on val for this
evaluation when its ``eval`` settings are overridden (:data:`OVERRIDABLE`); nothing is ever
chosen on test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oltr.artifact import (
    check_benchmark_fits,
    classifier_of,
    fit_rule,
    memory_of,
    rule_needs_train,
    saved_rule,
)
from oltr.data import dataset_for, load_benchmark, report_skipped_images
from oltr.data.datasets import Benchmark, ImageListDataset
from oltr.decision import SELECT_OBJECTIVES, DecisionRule
from oltr.detectors import list_detectors, odin_perturb, rule_detector
from oltr.detectors.head import network_head
from oltr.errors import InputError
from oltr.evaluation.external_open_sets import open_set_entries
from oltr.inference import eval_loader, forward_split, load_model
from oltr.openset import compute_open_score
from oltr.run import RunDir
from oltr.runtime import Runtime, init_runtime

#: ``eval`` settings an evaluation may override (fitting a rule on val for its report only).
OVERRIDABLE = ("open_score", "open_score_options", "threshold", "accept_rate",
               "logit_adjustment", "tau_normalization", "select")



def score_logits(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The logits open scores are computed on (``score_logits``: the model's own, or the
    adjusted ones under ``eval.open_score_logits: decision``), else the decision logits."""
    return outputs.get("score_logits", outputs["logits"])


def open_scores(
    name: str, outputs: dict[str, np.ndarray], centroids: np.ndarray | None
) -> np.ndarray:
    """The stateless open score ``name`` (msp, max_logit, energy; reachability with
    ``centroids``) of one split's stored outputs, on :func:`score_logits` (paper Fig. 8's
    MSP curves use it; the run's own open score is ``outputs["open_score"]``)."""
    if name == "reachability" and centroids is None:
        raise InputError("open score 'reachability' needs a model with a visual memory "
                         "(model.meta_embedding: true)", value=name)
    return compute_open_score(name, logits=score_logits(outputs), features=outputs.get("features"),
                              centroids=centroids)


@dataclass
class RunOutputs:
    """One forward pass per split of a trained run, and its decision rule applied to them:
    per split ``logits`` (the *decision* logits), ``score_logits`` (what the open score read),
    ``open_score`` (higher = more open), ``prediction`` (−1 = unknown), ``features``,
    ``labels`` (and ``reachability`` where the model has a memory)."""

    splits: dict[str, dict[str, np.ndarray]]
    train_counts: np.ndarray
    group_kw: dict[str, Any]
    centroids: np.ndarray | None
    logit_adjustment: float
    logit_adjustment_source: str
    tau_normalization: float
    tau_normalization_source: str | None
    info: dict[str, Any]
    stage_cfg: dict[str, Any]
    skipped: dict[str, int]
    rule: DecisionRule | None = None
    rule_source: str = ""
    net: nn.Module | None = field(default=None, repr=False)


def eval_settings(stage_cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's ``eval`` section with the evaluation's overrides (None = the run's own),
    checked: an InputError names the bad value."""
    eval_cfg = dict(stage_cfg["eval"])
    if overrides.get("open_score") is not None and overrides.get("open_score_options") is None:
        eval_cfg["open_score_options"] = {}  # the run's options belong to its own open score
    for key, value in overrides.items():
        if key not in OVERRIDABLE:
            raise ValueError(f"not an overridable eval setting: {key}")
        if value is not None:
            eval_cfg[key] = value
    if not isinstance(eval_cfg.get("open_score_options") or {}, dict):
        raise InputError("open-score options must be a mapping",
                         value=eval_cfg["open_score_options"])
    if eval_cfg["open_score"] not in (*list_detectors(), "auto"):
        raise InputError(f"unknown open score (valid: auto, {', '.join(list_detectors())})",
                         value=eval_cfg["open_score"])
    if eval_cfg["open_score"] != "auto":
        rule_detector(eval_cfg["open_score"], eval_cfg["open_score_options"])
    if eval_cfg["select"] not in SELECT_OBJECTIVES:
        raise InputError(f"the selection objective must be one of {', '.join(SELECT_OBJECTIVES)}",
                         value=eval_cfg["select"])
    if not 0.0 < eval_cfg["accept_rate"] <= 1.0:
        raise InputError("accept rate must lie in (0, 1]", value=eval_cfg["accept_rate"])
    threshold = eval_cfg["threshold"]
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and 0.0 <= threshold <= 1.0):
        raise InputError("a probability threshold must lie in [0, 1]", value=threshold)
    for name, key, minimum in (("logit adjustment", "logit_adjustment", -np.inf),
                               ("τ-normalisation", "tau_normalization", 0.0)):
        value = eval_cfg[key]
        if not (value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                    and np.isfinite(value) and value >= minimum)):
            raise InputError(f"{name} τ must be a finite number{' >= 0' if minimum == 0 else ''}"
                             " or auto", value=value)
    return eval_cfg


def collect_run_outputs(
    run_dir: str | Path | RunDir,
    data_dir: str | Path,
    splits: tuple[str, ...] = ("test", "val", "open"),
    *,
    open_sets: dict[str, str | Path] | None = None,
    device: str = "auto",
    skip_bad_images: bool | None = None,
    odin_perturbation: tuple[float, float] | None = None,
    overrides: dict[str, Any] | None = None,
    open_set: bool = True,
    runtime: Runtime | None = None,
    save_rule: bool = False,
    image_root: str | Path | None = None,
) -> RunOutputs:
    """Run a trained model once over ``splits`` of ``data_dir`` (and each external open set of
    ``open_sets``, stored under ``"open:<name>"``), and apply the run's decision rule.

    The rule is the one saved beside the weights when ``overrides`` (``eval`` settings, see
    :data:`OVERRIDABLE`) change nothing; otherwise (or when the run has none) one is fitted on
    val (and ``val_open``, and train for open scores that learn) with the overridden
    settings — never on test. A benchmark without an open split is evaluated without it when
    ``open_sets`` are given: they are then the only open images. ``odin_perturbation``
    (temperature, ε) adds ``odin_logits`` / ``odin_features``: the outputs of ODIN's perturbed
    inputs (:func:`oltr.detectors.odin_perturb`), for every split but train. ``save_rule``:
    a rule fitted here without overrides (the run had none, or one of other weights) is saved
    in the run (``RUN/decision.json``). ``image_root`` replaces the run's ``data.image_root``
    (images moved since training; the benchmark's manifest still vouches for them).
    """
    run = RunDir.of(run_dir)
    stage_dir = run.final_stage().path
    stage_cfg = run.stage_config()
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    eval_cfg = eval_settings(stage_cfg, given)
    runtime = runtime or init_runtime(device)
    net, info = load_model(stage_dir, runtime.device)
    bench = _run_benchmark(data_dir, stage_cfg, image_root)
    check_benchmark_fits(bench, info, data_dir)
    rule = None if given else saved_rule(run.path, info, eval_cfg, refuse_stale=False)
    rule_source = "saved with the weights" if rule is not None else "fitted on val for this report"
    wanted = _splits_to_run(splits, bench, data_dir, fits_rule=rule is None,
                            needs_train=rule is None and open_set and rule_needs_train(eval_cfg),
                            has_open_sets=bool(open_sets))
    skipped = _skip_bad_images(bench, wanted, stage_cfg["data"], skip_bad_images)

    datasets = _datasets(bench, wanted, open_sets, stage_cfg["data"])
    outputs = {split: forward_split(net, dataset, stage_cfg | {"eval": eval_cfg},
                                    device=runtime.device, description=split)
               for split, dataset in datasets.items()}
    if rule is None:
        rule = fit_rule(net, info, eval_cfg, outputs, open_set=open_set)
        if save_rule and not given and open_set and runtime.is_primary:
            rule.save(run.path)  # a run without one (or a stale one): predict can use it
            rule_source = "fitted on val and saved with the weights"
    classifier, head = classifier_of(net), network_head(net)
    if odin_perturbation is not None:  # ODIN's input pre-processing: one backward pass each
        _add_odin_outputs(outputs, net, datasets, odin_perturbation, eval_cfg["batch_size"],
                          stage_cfg["data"]["num_workers"], runtime.device)
    for split_outputs in outputs.values():
        _apply_rule(rule, split_outputs, classifier, head, open_set)
    group_kw = {"many_threshold": eval_cfg["many_threshold"],
                "few_threshold": eval_cfg["few_threshold"], "strict": eval_cfg["strict_shots"]}
    centroids = memory_of(net)
    return RunOutputs(
        splits=outputs, train_counts=np.asarray(bench.train_counts), group_kw=group_kw,
        centroids=None if centroids is None else centroids.numpy(),
        logit_adjustment=rule.logit_adjustment,
        logit_adjustment_source=rule.record.get("logit_adjustment", {}).get("source", "given"),
        tau_normalization=rule.tau_normalization,
        tau_normalization_source=rule.record.get("tau_normalization", {}).get("source"),
        info=info, stage_cfg=stage_cfg | {"eval": eval_cfg}, skipped=skipped, rule=rule,
        rule_source=rule_source, net=net)


def _skip_bad_images(bench: Benchmark, splits: Any, data_cfg: dict[str, Any],
                     skip: bool | None) -> dict[str, int]:
    """How many unreadable images each split leaves out (``skip``, default the run's
    ``data.skip_bad_images``; 0 each without it), dropped from ``bench`` and reported."""
    if skip is None:
        skip = data_cfg["skip_bad_images"]
    skipped = {split: 0 for split in splits}
    if skip:
        dropped = bench.drop_unreadable_images(tuple(splits), num_workers=data_cfg["num_workers"])
        report_skipped_images("[evaluate]", dropped)
        skipped |= {split: len(messages) for split, messages in dropped.items()}
    return skipped


def _add_odin_outputs(outputs: dict[str, dict[str, np.ndarray]], net: Any,
                      datasets: dict[str, Any], perturbation: tuple[float, float],
                      batch_size: int, num_workers: int, device: Any) -> None:
    """Add ``odin_logits`` / ``odin_features`` (the outputs of ODIN's perturbed inputs,
    :func:`oltr.detectors.odin_perturb`) to every split's outputs but train's."""
    temperature, epsilon = perturbation
    for split, dataset in datasets.items():
        if split != "train":
            loader = eval_loader(dataset, batch_size, num_workers)
            perturbed = perturbed_outputs(net, loader, device, temperature, epsilon)
            outputs[split] |= {f"odin_{key}": value for key, value in perturbed.items()}


def _run_benchmark(data_dir: str | Path, stage_cfg: dict[str, Any],
                   image_root: str | Path | None) -> Benchmark:
    """The benchmark at ``data_dir``, its images under ``image_root`` (default: the run's
    ``data.image_root``); a missing recorded image root says how to name the new one."""
    try:
        return load_benchmark(data_dir, image_root=image_root if image_root is not None
                              else stage_cfg["data"]["image_root"],
                              allow_outside_root=stage_cfg["data"]["allow_outside_root"])
    except InputError as exc:
        if image_root is None and stage_cfg["data"]["image_root"] is not None and str(
                exc).endswith("image root not found"):
            raise InputError(f"{exc} (the run's data.image_root, as it was given when it "
                             "trained; --image-root DIR names where the images are now)") from None
        raise


def _splits_to_run(splits: tuple[str, ...], bench: Benchmark, data_dir: str | Path, *,
                   fits_rule: bool, needs_train: bool, has_open_sets: bool) -> list[str]:
    """The benchmark splits to run the model over: ``splits``, plus what fitting a rule reads
    (``fits_rule``: val, val_open where curated, train where ``needs_train``). Without an
    open split, ``open`` is dropped when external open sets replace it, else an InputError."""
    wanted = list(dict.fromkeys(splits))
    if fits_rule:
        wanted += ["val", *(["val_open"] if bench.has_split("val_open") else []),
                   *(["train"] if needs_train else [])]
    if has_open_sets and "open" in wanted and not bench.has_split("open"):
        wanted.remove("open")  # curated without open classes: the external sets are the open ones
    elif "open" in wanted and not bench.has_split("open"):
        raise InputError("benchmark has no open split (curated without open classes): evaluate "
                         "without --open, or give open images of other classes with --open-set "
                         "NAME=DIR (a folder or a list file)", path=data_dir)
    return [split for split in dict.fromkeys(wanted)
            if split != "val_open" or bench.has_split(split)]


def _datasets(bench: Benchmark, wanted: list[str], open_sets: dict[str, str | Path] | None,
              data_cfg: dict[str, Any]) -> dict[str, Any]:
    """The evaluation datasets of the ``wanted`` benchmark splits, then of each external open
    set (under ``"open:<name>"``)."""
    datasets = {split: dataset_for(bench, split, data_cfg, train=False) for split in wanted}
    for name, spec in (open_sets or {}).items():
        entries, root, source_file = open_set_entries(spec)
        datasets[f"open:{name}"] = ImageListDataset(
            entries, root, source_file=source_file,
            mode="L" if data_cfg["channels"] == 1 else "RGB")
    return datasets


def _apply_rule(rule: DecisionRule, split_outputs: dict[str, np.ndarray],
                classifier: nn.Module | None, head: Any, open_set: bool) -> None:
    """Replace a split's model logits by the rule's decision logits and add its open scores."""
    decided = rule.apply(torch.from_numpy(split_outputs["logits"]),
                         torch.from_numpy(split_outputs["features"]), classifier=classifier,
                         head=head, open_set=open_set and rule.detector is not None)
    split_outputs["score_logits"] = decided["score_logits"].numpy()
    split_outputs["logits"] = decided["logits"].numpy()
    split_outputs["prediction"] = np.asarray(decided["prediction"])  # −1: unknown
    if "open_score" in decided:
        split_outputs["open_score"] = np.asarray(decided["open_score"], dtype=np.float64)
    if "odin_logits" in split_outputs:
        odin = rule.apply(torch.from_numpy(split_outputs["odin_logits"]),
                          torch.from_numpy(split_outputs["odin_features"]),
                          classifier=classifier, open_set=False)
        split_outputs["odin_logits"] = odin["score_logits"].numpy()


def perturbed_outputs(
    net: nn.Module, loader: Any, device: torch.device, temperature: float, epsilon: float
) -> dict[str, np.ndarray]:
    """Logits and features of ODIN's perturbed inputs (Liang et al. 2018, Eq. 2), float32; ε in
    the units of the normalised images."""
    net.eval()
    chunks: dict[str, list[np.ndarray]] = {"logits": [], "features": []}
    for images, _ in loader:
        perturbed = odin_perturb(lambda x: net(x).logits, images.to(device), temperature,
                                 epsilon)
        with torch.no_grad():
            out = net(perturbed)
        chunks["logits"].append(out.logits.float().cpu().numpy())
        chunks["features"].append(out.features.float().cpu().numpy())
    return {key: np.concatenate(parts) for key, parts in chunks.items()}
