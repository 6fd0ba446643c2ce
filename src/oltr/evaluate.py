"""Evaluation protocol → one JSON report (schema: ``docs/report.md``) and a printed table.

Closed set (paper Tab. 3): top-1 over the balanced known test split, and mean per-class accuracy
of the many / medium / few-shot groups. Open set: the known test split plus the open split, a
rejection rule (open score above a threshold → "unknown", label -1), the same group accuracies
(a rejected known image is an error), the F-measure (paper §D.4), and threshold-free detection
figures of the open score (AUROC, FPR@95 %TPR, AUPR, OSCR). The threshold is either a probability
(MSP only, the paper's 0.1) or calibrated on the known-only *validation* split — never on test.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from oltr import metrics
from oltr.config import load_saved_config
from oltr.data import load_benchmark
from oltr.engine import (
    collect_outputs,
    dataset_for,
    eval_loader,
    final_stage_dir,
    load_model,
    report_skipped_images,
    select_device,
)
from oltr.errors import InputError
from oltr.io import atomic_write_text
from oltr.openset import compute_open_score, msp_score, probability_threshold_to_msp_score

REPORT_VERSION = 1


def _round(value: Any) -> Any:
    """JSON-friendly floats (NaN → None)."""
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def adjust_logits(logits: np.ndarray, train_counts: np.ndarray, tau: float) -> np.ndarray:
    """Prior-corrected decision rule: logits + τ · log π, π the train class frequencies.

    A model trained class-balanced (OLTR stage 2) decides as if every class were equally
    likely (τ = 0); τ > 0 puts back part of the head classes' prior, τ = 1 all of it (trading
    tail for head accuracy, Menon et al. 2021's logit adjustment read in reverse).
    """
    if tau == 0:
        return logits
    prior = np.asarray(train_counts, dtype=np.float64)
    return (logits + tau * np.log(prior / prior.sum())).astype(logits.dtype)


TAU_GRID = tuple(i / 8 for i in range(9))


def select_logit_adjustment(
    val_logits: np.ndarray, val_labels: np.ndarray, train_counts: np.ndarray,
    group_kw: dict[str, Any], grid: tuple[float, ...] = TAU_GRID,
) -> float:
    """The smallest τ in ``grid`` whose many-shot accuracy on the known-only *val* split reaches
    that of τ = 1 (the full train prior): the tail gains as much as it can while the head
    classes stay as accurate as under the instance-balanced decision rule. Never uses test."""
    def many(tau: float) -> float | None:
        predictions = adjust_logits(val_logits, train_counts, tau).argmax(axis=1)
        return metrics.closed_set_accuracy(predictions, val_labels, train_counts,
                                           **group_kw)["many"]

    target = many(1.0)
    if target is None:  # no many-shot class: nothing to preserve
        return 0.0
    return next(tau for tau in (*grid, 1.0) if many(tau) >= target)


def open_scores(
    name: str, outputs: dict[str, np.ndarray], centroids: np.ndarray | None
) -> np.ndarray:
    """The open score (higher = more open) of one split's stored outputs."""
    if name == "reachability" and centroids is None:
        raise InputError("open score 'reachability' needs a model with a visual memory "
                         "(model.meta_embedding: true)", value=name)
    return compute_open_score(
        name, logits=outputs["logits"], features=outputs.get("features"), centroids=centroids
    )


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path,
    *,
    open_set: bool = True,
    open_score: str | None = None,
    threshold: float | None = None,
    accept_rate: float | None = None,
    device: str = "auto",
    output: str | Path | None = None,
    skip_bad_images: bool | None = None,
    logit_adjustment: float | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on ``data_dir``; write the report to ``output`` if given.

    ``logit_adjustment`` τ (default: the run's ``eval.logit_adjustment``) decides on
    logits + τ·log(train class frequency), see :func:`adjust_logits`.
    ``skip_bad_images`` (default: the run's ``data.skip_bad_images``) drops unreadable images
    of the evaluated splits instead of stopping; the report counts them (``skipped_images``).
    """
    started = time.perf_counter()
    stage_dir = final_stage_dir(run_dir)
    torch_device = select_device(device)
    net, info = load_model(stage_dir, torch_device)
    stage_cfg = load_saved_config(stage_dir / "config.yaml")
    eval_cfg = stage_cfg["eval"]
    open_score = open_score or eval_cfg["open_score"]
    threshold = eval_cfg["threshold"] if threshold is None else threshold
    accept_rate = eval_cfg["accept_rate"] if accept_rate is None else accept_rate
    if not 0.0 < accept_rate <= 1.0:
        raise InputError("accept rate must lie in (0, 1]", value=accept_rate)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError("a probability threshold must lie in [0, 1]", value=threshold)
    bench = load_benchmark(data_dir, image_root=stage_cfg["data"]["image_root"],
                           allow_outside_root=stage_cfg["data"]["allow_outside_root"])
    if bench.num_classes != info["num_classes"]:
        raise InputError(
            f"the model was trained on {info['num_classes']} classes but the data has "
            f"{bench.num_classes}", path=Path(data_dir),
        )
    if bench.class_names != info["class_names"]:
        raise InputError(
            f"the model was trained on the classes {info['class_names'][:5]} but the data has "
            f"{bench.class_names[:5]}", path=Path(data_dir),
        )
    if skip_bad_images is None:
        skip_bad_images = stage_cfg["data"]["skip_bad_images"]
    evaluated = ("test", "val", "open") if open_set else ("test",)
    skipped = {split: 0 for split in evaluated}
    if skip_bad_images:
        dropped = bench.drop_unreadable_images(evaluated,
                                               num_workers=stage_cfg["data"]["num_workers"])
        report_skipped_images("[evaluate]", dropped)
        skipped |= {split: len(messages) for split, messages in dropped.items()}

    group_kw = {
        "many_threshold": eval_cfg["many_threshold"],
        "few_threshold": eval_cfg["few_threshold"],
        "strict": eval_cfg["strict_shots"],
    }
    train_counts = np.asarray(bench.train_counts)
    amp, channels_last = stage_cfg["train"]["amp"], stage_cfg["train"]["channels_last"]

    def raw(split: str) -> dict[str, np.ndarray]:
        loader = eval_loader(dataset_for(bench, split, stage_cfg["data"], train=False),
                             eval_cfg["batch_size"], stage_cfg["data"]["num_workers"])
        return collect_outputs(net, loader, torch_device, amp=amp, channels_last=channels_last,
                               description=split)

    if logit_adjustment is None:
        logit_adjustment = eval_cfg["logit_adjustment"]
    raw_val = None
    if logit_adjustment == "auto":
        raw_val = raw("val")
        logit_adjustment = select_logit_adjustment(raw_val["logits"], raw_val["labels"],
                                                   train_counts, group_kw)
        tau_source = "selected on val: smallest τ keeping the many-shot accuracy of τ = 1"
    else:
        tau_source = "given"
    if not (isinstance(logit_adjustment, (int, float)) and logit_adjustment >= 0):
        raise InputError("logit adjustment τ must be a number >= 0 or auto",
                         value=logit_adjustment)

    def run(split: str) -> dict[str, np.ndarray]:
        outputs = raw_val if split == "val" and raw_val is not None else raw(split)
        adjusted = adjust_logits(outputs["logits"], train_counts, logit_adjustment)
        return {**outputs, "logits": adjusted}

    test = run("test")
    predictions = test["logits"].argmax(axis=1)
    confidence = 1.0 - msp_score(test["logits"])  # max softmax probability
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "run": str(run_dir),
        "stage": info["stage"],
        "data": str(data_dir),
        "method": stage_cfg.get("method"),
        "seed": stage_cfg["seed"],
        "selected_epoch": info.get("epoch"),
        "val_accuracy": info.get("val_accuracy"),
        "logit_adjustment": logit_adjustment,
        "logit_adjustment_source": tau_source,
        "shot_rule": {
            "many": f"{'>' if group_kw['strict'] else '>='} {group_kw['many_threshold']}",
            "few": f"{'<' if group_kw['strict'] else '<='} {group_kw['few_threshold']}",
        },
        "closed": metrics.closed_set_accuracy(predictions, test["labels"], train_counts,
                                              **group_kw),
        "calibration": {"ece": metrics.expected_calibration_error(
            confidence, predictions == test["labels"])},
    }

    if open_set:
        centroids = None
        if net.meta_embedding is not None:
            centroids = net.meta_embedding.centroids.detach().float().cpu().numpy()
        val, opened = run("val"), run("open")
        val_scores = open_scores(open_score, val, centroids)
        if threshold is not None:
            if open_score != "msp":
                raise InputError("a probability threshold applies to the msp open score only; "
                                 "leave it out to calibrate on val", value=threshold)
            score_threshold = probability_threshold_to_msp_score(threshold)
            source = f"probability {threshold}: reject when max softmax < {threshold}"
        else:
            score_threshold = metrics.calibrate_threshold(val_scores, accept_rate)
            source = f"calibrated on val: accepts {accept_rate:.0%} of known val images"
        scores = np.concatenate([open_scores(open_score, test, centroids),
                                 open_scores(open_score, opened, centroids)])
        labels = np.concatenate([test["labels"], opened["labels"]])
        all_predictions = np.concatenate([predictions, opened["logits"].argmax(axis=1)])
        is_open = labels == -1
        rejected = metrics.reject(all_predictions, scores, score_threshold)
        known_correct = (all_predictions == labels) & ~is_open
        report["open"] = {
            **metrics.open_set_accuracy(rejected, labels, train_counts, **group_kw),
            **metrics.f_measure(rejected, labels),
            "auroc": metrics.auroc(scores, is_open),
            "fpr95": metrics.fpr_at_tpr(scores, is_open, 0.95),
            "aupr_open": metrics.aupr(scores, is_open, positive="open"),
            "aupr_known": metrics.aupr(scores, is_open, positive="known"),
            "oscr": metrics.oscr(scores, known_correct, is_open),
            "detection_error": metrics.detection_error(scores, is_open),
            "threshold": score_threshold,
            "threshold_source": source,
            "open_score": open_score,
            "num_known": int((~is_open).sum()),
            "num_open": int(is_open.sum()),
        }
    report["skipped_images"] = skipped
    report["seconds"] = time.perf_counter() - started
    report = _round(report)
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{100 * value:5.1f}"


def format_report(report: dict[str, Any]) -> str:
    """A small table of the report's headline figures (percentages)."""
    closed = report["closed"]
    counts = closed.get("counts", {})
    lines = [
        (f"{report.get('method')} (seed {report.get('seed')}, stage {report.get('stage')}) "
        f"on {report.get('data')}   shots: many {report['shot_rule']['many']}, "
        f"few {report['shot_rule']['few']}"),
        "setting   many  medium   few  overall   F-meas  AUROC  FPR95",
        (f"closed   {_pct(closed['many'])}  {_pct(closed['medium'])}  {_pct(closed['few'])}"
        f"    {_pct(closed['overall'])}"),
    ]
    if "open" in report:
        op = report["open"]
        lines.append(
            f"open     {_pct(op['many'])}  {_pct(op['medium'])}  {_pct(op['few'])}    "
            f"{_pct(op['overall'])}    {op['f_measure']:.3f}  {_pct(op['auroc'])}  "
            f"{_pct(op['fpr95'])}"
        )
        lines.append(f"open score: {op['open_score']}, threshold {op['threshold']:.4f} "
                     f"({op['threshold_source']}); {op['num_known']} known + {op['num_open']} "
                     "open test images")
    if counts:
        lines.append(f"classes per group: many {counts.get('many')}, medium "
                     f"{counts.get('medium')}, few {counts.get('few')}")
    skipped = report.get("skipped_images") or {}
    if any(skipped.values()):
        per_split = ", ".join(f"{split} {count}" for split, count in skipped.items())
        lines.append(f"skipped {sum(skipped.values())} unreadable images ({per_split})")
    return "\n".join(lines)
