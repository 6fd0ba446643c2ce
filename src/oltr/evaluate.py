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

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oltr import metrics
from oltr.artifact import (
    check_benchmark_fits,
    classifier_of,
    fit_rule,
    memory_of,
    rule_needs_train,
    run_stage_config,
    saved_rule,
)
from oltr.data import dataset_for, load_benchmark, report_skipped_images
from oltr.data.datasets import ImageListDataset, published_open_folder
from oltr.data.paths import IMAGE_EXTENSIONS, check_image_paths, walk_images
from oltr.data.splits import read_split_lines
from oltr.decision import SELECT_OBJECTIVES, DecisionRule
from oltr.detectors import create_detector, list_detectors, odin_perturb, rule_detector
from oltr.detectors.head import network_head
from oltr.errors import InputError
from oltr.inference import EvalBatches, collect_outputs, eval_loader, load_model
from oltr.io import atomic_write_text
from oltr.openset import compute_open_score, msp_score
from oltr.ownership import check_report_output, lock_holder, locked, marker_kind
from oltr.run import final_stage_dir, stage_epochs
from oltr.runtime import Runtime, init_runtime

REPORT_VERSION = 2
#: ``eval`` settings an evaluation may override (fitting a rule on val for its report only).
OVERRIDABLE = ("open_score", "open_score_options", "threshold", "accept_rate",
               "logit_adjustment", "tau_normalization", "select")


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


def open_set_entries(spec: str | Path) -> tuple[list[tuple[str, int]], Path, Path | None]:
    """An external open set (paper Tab. 2's far-away images): a folder (every image under it,
    found by `oltr.data.paths.walk_images`) or a split file (``path label`` per line, paths
    relative to the file's folder — or, for ImageNet-LT's and Places-LT's published
    ``*_open.txt`` with its ``*_open/`` folder beside it, to that folder, a leading ``/``
    included (`oltr.data.datasets.published_open_folder`); labels are ignored — every image
    counts as open). Returns entries, image root and the split file.

    The user names this folder or file explicitly, so its images may lie anywhere: a split
    file may list absolute paths and paths with ``..``, and links in a folder may lead out of
    it (``data.allow_outside_root`` is about the benchmark's split files and does not apply).
    A link loop, an image reached twice or listed twice, and an empty path are InputErrors.
    """
    if not str(spec).strip():
        raise InputError("an external open set needs a path (a folder of images or a split "
                         "file)", value=str(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        images = walk_images(path, allow_outside_root=True)
        if not images:
            raise InputError("the open-set folder holds no image "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))})", path=path)
        return [(str(image.relative_to(path)), -1) for image in images], path, None
    if not path.exists():
        raise InputError("open set not found (give a folder of images or a split file)",
                         path=path)
    folder = published_open_folder(path)  # ImageNet_LT_open.txt → ImageNet_LT_open/
    root = path.parent if folder is None else folder
    entries, lines = read_split_lines(path, allow_open=True, allow_outside_root=True,
                                      slash_is_root=folder is not None)
    check_image_paths({"open": entries}, {"open": lines}, {"open": path}, root,
                      allow_outside_root=True)
    return [(image, -1) for image, _ in entries], root, path


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
    run_dir: str | Path,
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
    stage_dir = final_stage_dir(run_dir)
    stage_cfg = run_stage_config(run_dir)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    eval_cfg = eval_settings(stage_cfg, given)
    runtime = runtime or init_runtime(device)
    net, info = load_model(stage_dir, runtime.device)
    try:
        bench = load_benchmark(data_dir, image_root=image_root if image_root is not None
                               else stage_cfg["data"]["image_root"],
                               allow_outside_root=stage_cfg["data"]["allow_outside_root"])
    except InputError as exc:
        if image_root is None and stage_cfg["data"]["image_root"] is not None and str(
                exc).endswith("image root not found"):
            raise InputError(f"{exc} (the run's data.image_root, as it was given when it "
                             "trained; --image-root DIR names where the images are now)") from None
        raise
    check_benchmark_fits(bench, info, data_dir)
    rule = None if given else saved_rule(Path(run_dir), info, eval_cfg, refuse_stale=False)
    rule_source = "saved with the weights" if rule is not None else "fitted on val for this report"
    wanted = list(dict.fromkeys(splits))
    if rule is None:
        wanted += ["val", *(["val_open"] if bench.has_split("val_open") else []),
                   *(["train"] if open_set and rule_needs_train(eval_cfg) else [])]
    if open_sets and "open" in wanted and not bench.has_split("open"):
        wanted.remove("open")  # curated without open classes: the external sets are the open ones
    elif "open" in wanted and not bench.has_split("open"):
        raise InputError("benchmark has no open split (curated without open classes): evaluate "
                         "without --open, or give open images of other classes with --open-set "
                         "NAME=DIR (a folder or a list file)", path=data_dir)
    wanted = [split for split in dict.fromkeys(wanted)
              if split != "val_open" or bench.has_split(split)]
    if skip_bad_images is None:
        skip_bad_images = stage_cfg["data"]["skip_bad_images"]
    skipped = {split: 0 for split in wanted}
    if skip_bad_images:
        dropped = bench.drop_unreadable_images(tuple(wanted),
                                               num_workers=stage_cfg["data"]["num_workers"])
        report_skipped_images("[evaluate]", dropped)
        skipped |= {split: len(messages) for split, messages in dropped.items()}

    data_cfg, batch_size = stage_cfg["data"], eval_cfg["batch_size"]
    datasets = {split: dataset_for(bench, split, data_cfg, train=False) for split in wanted}
    for name, spec in (open_sets or {}).items():
        entries, root, source_file = open_set_entries(spec)
        datasets[f"open:{name}"] = ImageListDataset(
            entries, root, source_file=source_file,
            mode="L" if data_cfg["channels"] == 1 else "RGB")
    keys = ("logits", "features", "reachability")
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for split, dataset in datasets.items():
        batches = EvalBatches(dataset, data_cfg, batch_size=batch_size,
                              num_workers=data_cfg["num_workers"], device=runtime.device)
        outputs[split] = collect_outputs(net, batches, runtime.device, amp=eval_cfg["amp"],
                                         channels_last=stage_cfg["train"]["channels_last"],
                                         keys=keys, description=split)
    if rule is None:
        rule = fit_rule(net, info, eval_cfg, outputs, open_set=open_set)
        if save_rule and not given and open_set and runtime.is_primary:
            rule.save(Path(run_dir))  # a run without one (or a stale one): predict can use it
            rule_source = "fitted on val and saved with the weights"
    classifier, head = classifier_of(net), network_head(net)
    if odin_perturbation is not None:  # ODIN's input pre-processing: one backward pass each
        temperature, epsilon = odin_perturbation
        for split, dataset in datasets.items():
            if split != "train":
                loader = eval_loader(dataset, batch_size, data_cfg["num_workers"])
                perturbed = perturbed_outputs(net, loader, runtime.device, temperature, epsilon)
                outputs[split] |= {f"odin_{key}": value for key, value in perturbed.items()}
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


def _apply_rule(rule: DecisionRule, split_outputs: dict[str, np.ndarray],
                classifier: nn.Module | None, head: Any, open_set: bool) -> None:
    """Replace a split's model logits by the rule's decision logits and add its open scores."""
    features = torch.from_numpy(split_outputs["features"])
    raw = torch.from_numpy(split_outputs["logits"])
    model_logits = rule.closed_logits(raw, features, classifier)
    if open_set and rule.detector is not None:
        decided = rule.apply(raw, features, classifier=classifier, head=head)
    else:
        decided = {"logits": rule.adjust(model_logits)}
    split_outputs["score_logits"] = (rule.adjust(model_logits)
                                     if rule.open_score_logits == "decision"
                                     else model_logits).numpy()
    split_outputs["logits"] = decided["logits"].numpy()
    if "open_score" in decided:
        split_outputs["open_score"] = np.asarray(decided["open_score"], dtype=np.float64)
        split_outputs["prediction"] = np.asarray(decided["prediction"])
    if "odin_logits" in split_outputs:
        odin = rule.closed_logits(torch.from_numpy(split_outputs["odin_logits"]),
                                  torch.from_numpy(split_outputs["odin_features"]), classifier)
        split_outputs["odin_logits"] = (rule.adjust(odin) if rule.open_score_logits == "decision"
                                        else odin).numpy()


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


def open_set_figures(
    known: dict[str, np.ndarray], opened: dict[str, np.ndarray], known_scores: np.ndarray,
    open_scores_: np.ndarray, threshold: float, train_counts: np.ndarray,
    group_kw: dict[str, Any],
) -> dict[str, Any]:
    """Open-set accuracies and F-measure at ``threshold`` and the threshold-free detection
    figures, for the known test outputs plus one open split's (scores: higher = more open)."""
    scores = np.concatenate([known_scores, open_scores_])
    labels = np.concatenate([known["labels"], np.full(len(open_scores_), -1)])
    predictions = np.concatenate([known["logits"].argmax(axis=1),
                                  opened["logits"].argmax(axis=1)])
    is_open = labels == -1
    rejected = metrics.reject(predictions, scores, threshold)
    known_correct = (predictions == labels) & ~is_open
    return {
        **metrics.open_set_accuracy(rejected, labels, train_counts, **group_kw),
        **metrics.f_measure(rejected, labels),
        "auroc": metrics.auroc(scores, is_open),
        "fpr95": metrics.fpr_at_tpr(scores, is_open, 0.95),
        "aupr_open": metrics.aupr(scores, is_open, positive="open"),
        "aupr_known": metrics.aupr(scores, is_open, positive="known"),
        "oscr": metrics.oscr(scores, known_correct, is_open),
        "detection_error": metrics.detection_error(scores, is_open),
        "threshold": threshold,
        "num_known": int((~is_open).sum()),
        "num_open": int(is_open.sum()),
    }


def detector_scores(
    names: list[str], outputs: RunOutputs, splits: list[str],
    options: dict[str, dict[str, Any]] | None = None,
    inapplicable: dict[str, str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Open scores of each detector in ``names`` on each of ``splits``; detectors that learn
    are fitted on the *train* split's outputs (features, logits, labels). Reachability uses
    the model's own memory where it has one, else class means of train features; ReAct, ASH,
    SCALE and ViM read the model's head.

    A detector that does not apply to this model (its fit or score raises
    :class:`~oltr.errors.InputError`, e.g. ASH on features that can be negative) raises, or —
    with a dict ``inapplicable`` — is left out of the result and its reason recorded there."""
    options = options or {}
    head = network_head(outputs.net) if outputs.net is not None else None
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        kwargs = dict(options.get(name, {}))
        if name == "reachability" and outputs.centroids is not None:
            kwargs.setdefault("centroids", outputs.centroids)
        detector = create_detector(name, **kwargs)
        try:
            if not detector.is_fitted:
                train = outputs.splits["train"]
                detector.fit(logits=score_logits(train), features=train["features"],
                             labels=train["labels"], head=head)
            scores[name] = {
                split: detector.score(
                    logits=outputs.splits[split].get("odin_logits",
                                                     score_logits(outputs.splits[split]))
                    if name == "odin" else score_logits(outputs.splits[split]),  # ODIN: perturbed
                    features=outputs.splits[split]["features"], head=head)
                for split in splits
            }
        except InputError as exc:
            if inapplicable is None:
                raise
            inapplicable[name] = str(exc)
    return scores


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
    stage_cfg = run_stage_config(run_dir)
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
        return _evaluate(run_dir, data_dir, stage_cfg, started, open_set=open_set,
                         overrides=overrides, device=device, output=output,
                         skip_bad_images=skip_bad_images, detectors=detectors,
                         detector_options=detector_options, open_sets=open_sets,
                         save_rule=save_rule, strict_shots=strict_shots,
                         image_root=image_root)


def _evaluate(
    run_dir: str | Path,
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
    """The body of :func:`evaluate_run`, its output checked and its run locked."""
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
        odin_perturbation = (odin.get("temperature", 1000.0), odin["epsilon"])
    outputs = collect_run_outputs(
        run_dir, data_dir, splits, open_sets=open_sets, device=device,
        skip_bad_images=skip_bad_images, odin_perturbation=odin_perturbation,
        overrides=overrides, open_set=open_set, save_rule=save_rule, image_root=image_root)
    info, group_kw, train_counts = outputs.info, outputs.group_kw, outputs.train_counts
    if strict_shots is not None:
        group_kw = {**group_kw, "strict": bool(strict_shots)}
    rule, eval_cfg = outputs.rule, outputs.stage_cfg["eval"]
    assert rule is not None
    test = outputs.splits["test"]
    predictions = test["logits"].argmax(axis=1)
    confidence = 1.0 - msp_score(test["logits"])  # max softmax probability
    done, total = stage_epochs(final_stage_dir(run_dir))
    if total is not None and done < total:
        print(f"note: stage '{info['stage']}' stopped at epoch {done} of {total} (killed or not "
              "finished): these are its best weights so far, not a finished training "
              "(report.json: stage_epochs)", file=sys.stderr)
    report: dict[str, Any] = {
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
        "closed": metrics.closed_set_accuracy(predictions, test["labels"], train_counts,
                                              **group_kw),
        "calibration": {"ece": metrics.expected_calibration_error(
            confidence, predictions == test["labels"])},
    }

    if open_set:
        # no open split (a benchmark curated without open classes): the external open sets
        # are the only open images, so there is no "open" section, only "open_sets"
        opened = outputs.splits.get("open")
        external = [split for split in outputs.splits if split.startswith("open:")]
        source = rule.record.get("threshold", {}).get("source", "")
        assert rule.threshold is not None
        if opened is not None:
            report["open"] = {
                **open_set_figures(test, opened, test["open_score"], opened["open_score"],
                                   rule.threshold, train_counts, group_kw),
                "threshold_source": source,
                "open_score": rule.open_score,
                "open_score_source": rule.record.get("open_score", {}).get("source", ""),
            }
        if external:
            report["open_sets"] = {
                split.removeprefix("open:"): {
                    **open_set_figures(test, outputs.splits[split], test["open_score"],
                                       outputs.splits[split]["open_score"], rule.threshold,
                                       train_counts, group_kw),
                    "threshold_source": source,
                    "open_score": rule.open_score,
                }
                for split in external
            }
        if detectors:
            inapplicable: dict[str, str] = {}
            scored = detector_scores(
                detectors, outputs,
                ["val", "test", *(["open"] if opened is not None else []), *external],
                detector_options, inapplicable=inapplicable)
            report["detectors"] = {}
            report["detector_options"] = detector_options or {}
            for name, reason in inapplicable.items():
                print(f"warning: detector {name} does not apply to this model: {reason}",
                      file=sys.stderr)
            report["detectors_inapplicable"] = inapplicable
            for name, by_split in scored.items():
                cut = metrics.calibrate_threshold(by_split["val"], eval_cfg["accept_rate"])
                entry = {} if opened is None else open_set_figures(
                    test, opened, by_split["test"], by_split["open"], cut, train_counts,
                    group_kw)
                for split in external:
                    entry[split] = open_set_figures(test, outputs.splits[split],
                                                    by_split["test"], by_split[split], cut,
                                                    train_counts, group_kw)
                report["detectors"][name] = entry
    report["skipped_images"] = outputs.skipped
    report["seconds"] = time.perf_counter() - started
    report = _round(report)
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def _pct(value: float | None) -> str:
    return f"{metrics.percent_text(value) or 'n/a':>5}"


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
    detectors = {name: figures for name, figures in (report.get("detectors") or {}).items()
                 if "auroc" in figures}
    if detectors:
        lines.append("detectors (each threshold fitted on val):  F-meas  AUROC  FPR95")
        lines += [f"  {name:<38} {figures['f_measure']:.3f}  {_pct(figures['auroc'])}  "
                  f"{_pct(figures['fpr95'])}" for name, figures in detectors.items()]
    for name, figures in (report.get("open_sets") or {}).items():
        lines.append(f"open set {name!r}: F-measure {figures['f_measure']:.3f}, AUROC "
                     f"{_pct(figures['auroc']).strip()}, FPR95 {_pct(figures['fpr95']).strip()} "
                     f"({figures['num_known']} known + {figures['num_open']} open images)")
    if counts:
        lines.append(f"classes per group: many {counts.get('many')}, medium "
                     f"{counts.get('medium')}, few {counts.get('few')}")
    skipped = report.get("skipped_images") or {}
    if any(skipped.values()):
        per_split = ", ".join(f"{split} {count}" for split, count in skipped.items())
        lines.append(f"skipped {sum(skipped.values())} unreadable images ({per_split})")
    return "\n".join(lines)
