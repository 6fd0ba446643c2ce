"""Evaluation protocol → one JSON report (schema: ``docs/report.md``) and a printed table.

Closed set (paper Tab. 3): top-1 over the balanced known test split, and mean per-class accuracy
of the many / medium / few-shot groups. Open set: the known test split plus the open split, a
rejection rule (open score above a threshold → "unknown", label -1), the same group accuracies
(a rejected known image is an error), the F-measure (paper §D.4), and threshold-free detection
figures of the open score (AUROC, FPR@95 %TPR, AUPR, OSCR).

The decision — τ-normalisation, logit adjustment, open score and threshold — is the run's
decision rule (`oltr.decision`), fitted on val when the run was trained and saved beside its
weights; evaluation applies it to test. Options given here (another open score, τ, threshold,
selection objective) fit a rule on val for this report only. Nothing is ever chosen on test.

Everything in a report derives from one set of weights, and the report says which
(``weights``: the stage, epoch and sha256 of ``model.safetensors`` as loaded). A report
replaces only an oltr report (:func:`oltr.ownership.check_report_output`, checked before the
evaluation runs); writing it into a run takes the run's lock, so a run still training is not
written into.
"""
from __future__ import annotations

import inspect
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from oltr import metrics
from oltr.decision import DecisionRule
from oltr.detectors import create_detector, list_detectors
from oltr.detectors.odin import ODIN
from oltr.errors import InputError
from oltr.evaluation.detector_sweep import detector_scores
from oltr.evaluation.open_set import open_set_figures
from oltr.evaluation.run_outputs import RunOutputs, collect_run_outputs, eval_settings
from oltr.io import atomic_write_text
from oltr.openset import msp_score
from oltr.ownership import check_report_output, lock_holder, locked, marker_kind
from oltr.run import RunDir

REPORT_VERSION = 2
#: ODIN's temperature where its options name none (the detector's own default).
ODIN_TEMPERATURE: float = inspect.signature(ODIN).parameters["temperature"].default


def _round(value: Any) -> Any:
    """JSON-friendly floats (NaN → None)."""
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else round(float(value), metrics.REPORT_DECIMALS)
    if isinstance(value, np.integer):
        return int(value)
    return value


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
    logit_adjustment: float | str | None = None,
    tau_normalization: float | str | None = None,
    select: str | None = None,
    open_score_options: dict[str, Any] | None = None,
    detectors: list[str] | None = None,
    detector_options: dict[str, dict[str, Any]] | None = None,
    open_sets: dict[str, str | Path] | None = None,
    strict_shots: bool | None = None,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on ``data_dir``; write the report to ``output`` if given.

    The decision is the run's rule (see the module docstring); ``open_score``, ``threshold``
    (a probability, msp only), ``accept_rate``, ``logit_adjustment``, ``tau_normalization``
    and ``select`` override its settings, and a rule is then fitted on val for this report.
    ``skip_bad_images`` (default: the run's ``data.skip_bad_images``) drops unreadable images
    of the evaluated splits instead of stopping; the report counts them (``skipped_images``).
    ``detectors`` (names of :mod:`oltr.detectors`) adds one open-set entry per detector under
    ``report["detectors"]``, each with its own threshold calibrated on val
    (``detector_options``: constructor arguments per detector; ODIN with ``epsilon`` > 0 runs
    its input perturbation, a backward pass per image); ``open_sets``
    (name → folder or split file) adds the same figures per external open set under
    ``report["open_sets"]``. ``strict_shots`` (default: the run's ``eval.strict_shots``)
    chooses the shot groups' boundaries: the paper's ``> many`` / ``< few`` or the original
    code's ``>=`` / ``<=``; it changes only how classes are grouped in the report
    (``shot_rule`` says which), never a decision. ``image_root`` (default: the run's
    ``data.image_root``) is where the split files' image paths are looked up.
    """
    started = time.perf_counter()
    run = RunDir(run_dir)
    stage_cfg = run.stage_config()
    if output is not None:
        check_report_output(output)
    writes_into_run = output is not None and Path(output).expanduser().resolve().is_relative_to(
        Path(run_dir).resolve())
    if writes_into_run and marker_kind(Path(run_dir)) == "run":
        guard = locked(Path(run_dir), "run directory")  # not while it trains
    else:
        guard = nullcontext()
        holder = lock_holder(Path(run_dir))
        if holder is not None:
            print(f"warning: {run_dir} is still training ({holder}); this evaluates the weights "
                  "selected so far", file=sys.stderr, flush=True)
    overrides = {"open_score": open_score, "threshold": threshold, "accept_rate": accept_rate,
                 "logit_adjustment": logit_adjustment, "tau_normalization": tau_normalization,
                 "select": select, "open_score_options": open_score_options}
    # the rule is saved into the run only by an evaluation that holds its lock, or of a run
    # that nobody trains
    save_rule = marker_kind(Path(run_dir)) == "run" and (
        writes_into_run or lock_holder(Path(run_dir)) is None)
    with guard:
        return _evaluate(run_dir, run, data_dir, stage_cfg, started, open_set=open_set,
                         overrides=overrides, device=device, output=output,
                         skip_bad_images=skip_bad_images, detectors=detectors,
                         detector_options=detector_options, open_sets=open_sets,
                         save_rule=save_rule, strict_shots=strict_shots,
                         image_root=image_root)


def _evaluate(
    run_dir: str | Path,
    run: RunDir,
    data_dir: str | Path,
    stage_cfg: dict[str, Any],
    started: float,
    *,
    open_set: bool,
    overrides: dict[str, Any],
    device: str,
    output: str | Path | None,
    skip_bad_images: bool | None,
    detectors: list[str] | None,
    detector_options: dict[str, dict[str, Any]] | None,
    open_sets: dict[str, str | Path] | None,
    save_rule: bool = False,
    strict_shots: bool | None = None,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """The body of :func:`evaluate_run`, its output checked and its run locked (``run``: the
    files of ``run_dir``)."""
    eval_settings(stage_cfg, {k: v for k, v in overrides.items() if v is not None})
    if open_sets and not open_set:
        raise InputError("external open sets need the open-set evaluation (drop --closed-only)")
    detectors = list(dict.fromkeys(detectors or []))
    unknown = [name for name in detectors if name not in list_detectors()]
    if unknown:
        raise InputError(f"unknown detector (valid: {', '.join(list_detectors())})",
                         value=unknown[0])
    splits = ("test", "val", "open") if open_set else ("test",)
    if any(create_detector(name, **(detector_options or {}).get(name, {})).fit_inputs
           for name in detectors):
        splits = (*splits, "train")
    odin = (detector_options or {}).get("odin", {})
    odin_perturbation = None
    if "odin" in detectors and odin.get("epsilon", 0.0) > 0:
        odin_perturbation = (odin.get("temperature", ODIN_TEMPERATURE), odin["epsilon"])
    outputs = collect_run_outputs(
        run, data_dir, splits, open_sets=open_sets, device=device,
        skip_bad_images=skip_bad_images, odin_perturbation=odin_perturbation,
        overrides=overrides, open_set=open_set, save_rule=save_rule, image_root=image_root)
    if open_set and outputs.rule is not None and outputs.rule.threshold is None:
        raise InputError(
            "the run's decision rule is closed-set (threshold null): it answers no image "
            "'unknown', so it has no open-set figures; evaluate without --open, or get "
            "open-set figures from a rule fitted for this report with --open-score NAME|auto "
            "(and --threshold P or --accept-rate R)", path=run.decision_path)
    group_kw = outputs.group_kw
    if strict_shots is not None:
        group_kw = {**group_kw, "strict": bool(strict_shots)}
    report = _closed_report(run_dir, run, data_dir, stage_cfg, outputs, group_kw)
    if open_set:
        report |= _open_report(outputs, group_kw)
        if detectors:
            report |= _detector_report(outputs, group_kw, detectors, detector_options)
    report["skipped_images"] = outputs.skipped
    report["seconds"] = time.perf_counter() - started
    report = _round(report)
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def _closed_report(run_dir: str | Path, run: RunDir, data_dir: str | Path,
                   stage_cfg: dict[str, Any], outputs: RunOutputs, group_kw: dict[str, Any]
                   ) -> dict[str, Any]:
    """The report's header (run, weights, decision rule, shot rule) and its closed-set
    figures; a note on stderr when the final stage did not finish its epochs."""
    info, rule, eval_cfg = outputs.info, outputs.rule, outputs.stage_cfg["eval"]
    assert rule is not None
    test = outputs.splits["test"]
    predictions = test["logits"].argmax(axis=1)
    confidence = 1.0 - msp_score(test["logits"])  # max softmax probability
    done, total = run.final_stage().epochs()
    if total is not None and done < total:
        print(f"note: stage '{info['stage']}' stopped at epoch {done} of {total} (killed or not "
              "finished): these are its best weights so far, not a finished training "
              "(report.json: stage_epochs)", file=sys.stderr)
    return {
        "report_version": REPORT_VERSION,
        "run": str(run_dir),
        "stage": info["stage"],
        "stage_epochs": {"finished": done, "configured": total},
        "data": str(data_dir),
        "method": stage_cfg.get("method"),
        "seed": stage_cfg["seed"],
        "selected_epoch": info.get("epoch"),
        "val_accuracy": info.get("val_accuracy"),
        "weights": {"stage": info["stage"], "epoch": info.get("epoch"),
                    "sha256": info["weights_sha256"]},
        "decision_rule": {"source": outputs.rule_source, "select": rule.record.get("select"),
                          "record": rule.record},
        "logit_adjustment": outputs.logit_adjustment,
        "logit_adjustment_source": outputs.logit_adjustment_source,
        "tau_normalization": outputs.tau_normalization,
        "tau_normalization_source": outputs.tau_normalization_source,
        "open_score_logits": rule.open_score_logits,
        "eval_amp": eval_cfg["amp"],
        "shot_rule": {
            "many": f"{'>' if group_kw['strict'] else '>='} {group_kw['many_threshold']}",
            "few": f"{'<' if group_kw['strict'] else '<='} {group_kw['few_threshold']}",
        },
        "closed": metrics.closed_set_accuracy(predictions, test["labels"], outputs.train_counts,
                                              **group_kw),
        "calibration": {"ece": metrics.expected_calibration_error(
            confidence, predictions == test["labels"])},
    }


def _external_splits(outputs: RunOutputs) -> list[str]:
    return [split for split in outputs.splits if split.startswith("open:")]


def _open_report(outputs: RunOutputs, group_kw: dict[str, Any]) -> dict[str, Any]:
    """``open`` (the run's rule on the open split) and ``open_sets`` (on each external open
    set). A benchmark without an open split (curated without open classes) has no ``open``
    section: the external open sets are its only open images."""
    rule: DecisionRule | None = outputs.rule
    assert rule is not None and rule.threshold is not None
    test, opened = outputs.splits["test"], outputs.splits.get("open")
    source = rule.record.get("threshold", {}).get("source", "")
    report: dict[str, Any] = {}
    if opened is not None:
        report["open"] = {
            **open_set_figures(test, opened, test["open_score"], opened["open_score"],
                               rule.threshold, outputs.train_counts, group_kw),
            "threshold_source": source,
            "open_score": rule.open_score,
            "open_score_source": rule.record.get("open_score", {}).get("source", ""),
        }
    external = _external_splits(outputs)
    if external:
        report["open_sets"] = {
            split.removeprefix("open:"): {
                **open_set_figures(test, outputs.splits[split], test["open_score"],
                                   outputs.splits[split]["open_score"], rule.threshold,
                                   outputs.train_counts, group_kw),
                "threshold_source": source,
                "open_score": rule.open_score,
            }
            for split in external
        }
    return report


def _detector_report(outputs: RunOutputs, group_kw: dict[str, Any], detectors: list[str],
                     detector_options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """``detectors``: per detector, the open-set figures on the open split and on each external
    open set, its threshold calibrated on val at the run's accept rate; the detectors that do
    not apply to this model are named with their reason (and a warning on stderr)."""
    test, opened = outputs.splits["test"], outputs.splits.get("open")
    external = _external_splits(outputs)
    inapplicable: dict[str, str] = {}
    scored = detector_scores(
        detectors, outputs,
        ["val", "test", *(["open"] if opened is not None else []), *external],
        detector_options, inapplicable=inapplicable)
    report: dict[str, Any] = {"detectors": {}, "detector_options": detector_options or {}}
    for name, reason in inapplicable.items():
        print(f"warning: detector {name} does not apply to this model: {reason}",
              file=sys.stderr)
    report["detectors_inapplicable"] = inapplicable
    accept_rate = outputs.stage_cfg["eval"]["accept_rate"]
    for name, by_split in scored.items():
        cut = metrics.calibrate_threshold(by_split["val"], accept_rate)
        entry = {} if opened is None else open_set_figures(
            test, opened, by_split["test"], by_split["open"], cut, outputs.train_counts,
            group_kw)
        for split in external:
            entry[split] = open_set_figures(test, outputs.splits[split],
                                            by_split["test"], by_split[split], cut,
                                            outputs.train_counts, group_kw)
        report["detectors"][name] = entry
    return report
