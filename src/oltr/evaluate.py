"""Evaluation protocol → one JSON report (schema: ``docs/report.md``) and a printed table.

Closed set (paper Tab. 3): top-1 over the balanced known test split, and mean per-class accuracy
of the many / medium / few-shot groups. Open set: the known test split plus the open split, a
rejection rule (open score above a threshold → "unknown", label -1), the same group accuracies
(a rejected known image is an error), the F-measure (paper §D.4), and threshold-free detection
figures of the open score (AUROC, FPR@95 %TPR, AUPR, OSCR). The threshold is either a probability
(MSP only, the paper's 0.1) or calibrated on the known-only *validation* split — never on test.

Everything in a report derives from one set of weights, and the report says which
(``weights``: the stage, epoch and sha256 of ``model.safetensors`` as loaded): ``oltr predict``
uses a report's threshold and decision rule only with those very weights. A report replaces only
an oltr report (:func:`oltr.ownership.check_report_output`, checked before the evaluation
runs); writing it into a run takes the run's lock, so a run still training is not written into.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oltr import metrics
from oltr.config import load_saved_config, stage_config, with_defaults
from oltr.data import load_benchmark
from oltr.data.datasets import ImageListDataset
from oltr.data.paths import IMAGE_EXTENSIONS, check_image_paths, walk_images
from oltr.data.splits import read_split_lines
from oltr.detectors import create_detector, list_detectors, odin_perturb
from oltr.engine import (
    collect_outputs,
    dataset_for,
    eval_loader,
    eval_transform,
    final_stage_dir,
    load_model,
    report_skipped_images,
    select_device,
)
from oltr.errors import InputError
from oltr.io import atomic_write_text
from oltr.models.classifiers import tau_normalize
from oltr.openset import compute_open_score, msp_score, probability_threshold_to_msp_score
from oltr.ownership import check_report_output, lock_holder, locked, marker_kind

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
    τ < 0 is Menon et al. (ICLR 2021)'s post-hoc logit adjustment of an instance-trained model
    (τ = −1: decide as if the classes were balanced).

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
    """The smallest τ in ``grid`` (and 1) whose many-shot accuracy on the known-only *val*
    split is the best any τ reaches: the tail gains as much as it can while the head classes
    stay as accurate as any prior correction makes them. (The head's accuracy need not rise
    monotonically up to τ = 1: a larger τ also moves many-shot images to the largest class.)
    Never uses test."""
    def many(tau: float) -> float | None:
        predictions = adjust_logits(val_logits, train_counts, tau).argmax(axis=1)
        return metrics.closed_set_accuracy(predictions, val_labels, train_counts,
                                           **group_kw)["many"]

    candidates = sorted({*grid, 1.0})
    accuracies = [many(tau) for tau in candidates]
    if accuracies[0] is None:  # no many-shot class: nothing to preserve
        return 0.0
    best = max(accuracies)
    return next(tau for tau, accuracy in zip(candidates, accuracies) if accuracy >= best)


def open_scores(
    name: str, outputs: dict[str, np.ndarray], centroids: np.ndarray | None
) -> np.ndarray:
    """The open score (higher = more open) of one split's stored outputs (on
    :func:`score_logits`)."""
    if name == "reachability" and centroids is None:
        raise InputError("open score 'reachability' needs a model with a visual memory "
                         "(model.meta_embedding: true)", value=name)
    return compute_open_score(name, logits=score_logits(outputs), features=outputs.get("features"),
                              centroids=centroids)


def score_logits(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The logits open scores are computed on: the model's own (``score_logits``: before the
    logit adjustment, which moves the closed-set decision only) where stored, else the
    decision logits."""
    return outputs.get("score_logits", outputs["logits"])


TAU_NORM_GRID = tuple(i / 10 for i in range(21))


def tau_normalized_logits(
    features: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, tau: float
) -> np.ndarray:
    """Logits of a linear classifier whose rows are τ-normalised (Kang et al. 2020, §4):
    ``v · (w_k / ‖w_k‖^τ) + b_k``. τ = 0 gives the classifier's own logits."""
    normalized = tau_normalize(torch.from_numpy(weight).double(), tau).numpy()
    logits = features.astype(np.float64) @ normalized.T
    if bias is not None:
        logits = logits + bias
    return logits.astype(np.float32)


def select_tau_normalization(
    val_features: np.ndarray, val_labels: np.ndarray, weight: np.ndarray,
    bias: np.ndarray | None, grid: tuple[float, ...] = TAU_NORM_GRID,
) -> float:
    """τ of the τ-normalised classifier with the highest accuracy on the balanced *val* split
    (Kang et al. select τ on a validation set); ties go to the smaller τ. Never uses test."""
    accuracies = [
        float((tau_normalized_logits(val_features, weight, bias, tau).argmax(1)
               == val_labels).mean())
        for tau in grid
    ]
    return grid[int(np.argmax(accuracies))]


def open_set_entries(spec: str | Path) -> tuple[list[tuple[str, int]], Path, Path | None]:
    """An external open set (paper Tab. 2's far-away images): a folder (every image under it,
    found by `oltr.data.paths.walk_images`) or a split file (``path label`` per line, paths
    relative to the file's folder; labels are ignored — every image counts as open). Returns
    entries, image root and the split file.

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
    entries, lines = read_split_lines(path, allow_open=True, allow_outside_root=True)
    check_image_paths({"open": entries}, {"open": lines}, {"open": path}, path.parent,
                      allow_outside_root=True)
    return [(image, -1) for image, _ in entries], path.parent, path


def run_stage_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config of a run's final stage, as the *run* saved it (``RUN/config.yaml``):
    a stage folder shared by several runs (``oltr bench``'s cache: plain, τ-norm and post-hoc
    logit adjustment train the same stage) keeps the config of the run that trained it, but
    each run decides with its own ``eval`` settings. Falls back to the stage's own config."""
    stage_dir = final_stage_dir(run_dir)
    run_config = Path(run_dir) / "config.yaml"
    stage_cfg = load_saved_config(stage_dir / "config.yaml")
    if run_config.exists() and stage_dir.parent == Path(run_dir):
        config = load_saved_config(run_config)
        if "stages" in config and stage_dir.name in [s["name"] for s in config["stages"]]:
            return stage_config(with_defaults(config), stage_dir.name)
    return stage_cfg


@dataclass
class RunOutputs:
    """What one forward pass per split gives, for every metric and detector: per split the
    *decision* logits (after τ-normalisation and logit adjustment), direct features, labels
    (and γ where the model has a memory); plus what the decision rule was."""

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


def collect_run_outputs(
    run_dir: str | Path,
    data_dir: str | Path,
    splits: tuple[str, ...] = ("test", "val", "open"),
    *,
    open_sets: dict[str, str | Path] | None = None,
    device: str = "auto",
    skip_bad_images: bool | None = None,
    logit_adjustment: float | str | None = None,
    tau_normalization: float | str | None = None,
    odin_perturbation: tuple[float, float] | None = None,
) -> RunOutputs:
    """Run a trained model once over ``splits`` of ``data_dir`` (and each external open set of
    ``open_sets``, stored under ``"open:<name>"``) and return the decision logits and features.

    A benchmark without an open split (curated without open classes) is evaluated without it
    when ``open_sets`` are given: they are then the only open images.

    ``tau_normalization`` (default: the run's ``eval.tau_normalization``) and
    ``logit_adjustment`` (default: ``eval.logit_adjustment``) are applied in this order; an
    ``auto`` value is selected on the val split, never on test. ``odin_perturbation``
    (temperature, ε) adds ``odin_logits`` / ``odin_features``: the outputs of ODIN's perturbed
    inputs (:func:`oltr.detectors.odin_perturb`), for every split but train.
    """
    stage_dir = final_stage_dir(run_dir)
    torch_device = select_device(device)
    net, info = load_model(stage_dir, torch_device)
    stage_cfg = run_stage_config(run_dir)
    eval_cfg = stage_cfg["eval"]
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
    if tau_normalization is None:
        tau_normalization = eval_cfg["tau_normalization"]
    if logit_adjustment is None:
        logit_adjustment = eval_cfg["logit_adjustment"]
    for name, value, minimum in (("logit adjustment", logit_adjustment, -np.inf),
                                 ("τ-normalisation", tau_normalization, 0.0)):
        if not (value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                    and np.isfinite(value) and value >= minimum)):
            raise InputError(f"{name} τ must be a finite number{' >= 0' if minimum == 0 else ''}"
                             " or auto", value=value)
    needs_val = "auto" in (logit_adjustment, tau_normalization)
    wanted = list(dict.fromkeys([*splits, *(["val"] if needs_val else [])]))
    if open_sets and "open" in wanted and not bench.has_split("open"):
        wanted.remove("open")  # curated without open classes: the external sets are the open ones
    if skip_bad_images is None:
        skip_bad_images = stage_cfg["data"]["skip_bad_images"]
    skipped = {split: 0 for split in wanted}
    if skip_bad_images:
        dropped = bench.drop_unreadable_images(tuple(wanted),
                                               num_workers=stage_cfg["data"]["num_workers"])
        report_skipped_images("[evaluate]", dropped)
        skipped |= {split: len(messages) for split, messages in dropped.items()}

    amp, channels_last = eval_cfg["amp"], stage_cfg["train"]["channels_last"]

    def forward(dataset: ImageListDataset, description: str) -> dict[str, np.ndarray]:
        loader = eval_loader(dataset, eval_cfg["batch_size"], stage_cfg["data"]["num_workers"])
        return collect_outputs(net, loader, torch_device, amp=amp, channels_last=channels_last,
                               description=description)

    datasets = {split: dataset_for(bench, split, stage_cfg["data"], train=False)
                for split in wanted}
    for name, spec in (open_sets or {}).items():
        entries, root, source_file = open_set_entries(spec)
        datasets[f"open:{name}"] = ImageListDataset(
            entries, root, transform=eval_transform(stage_cfg["data"]), source_file=source_file,
            mode="L" if stage_cfg["data"]["channels"] == 1 else "RGB",
        )
    outputs = {split: forward(dataset, split) for split, dataset in datasets.items()}
    if odin_perturbation is not None:  # ODIN's input pre-processing: one backward pass each
        temperature, epsilon = odin_perturbation
        for split, dataset in datasets.items():
            if split != "train":
                loader = eval_loader(dataset, eval_cfg["batch_size"],
                                     stage_cfg["data"]["num_workers"])
                perturbed = perturbed_outputs(net, loader, torch_device, temperature, epsilon)
                outputs[split] |= {f"odin_{key}": value for key, value in perturbed.items()}

    tau_source = None
    if tau_normalization == "auto" or tau_normalization > 0:
        classifier = net.classifier
        if not isinstance(classifier, nn.Linear) or net.meta_embedding is not None:
            raise InputError("τ-normalisation needs a model with a linear classifier on the "
                             "direct feature (no meta-embedding)", value=tau_normalization)
        weight = classifier.weight.detach().float().cpu().numpy()
        bias = None if classifier.bias is None else classifier.bias.detach().float().cpu().numpy()
        if tau_normalization == "auto":
            tau_normalization = select_tau_normalization(
                outputs["val"]["features"], outputs["val"]["labels"], weight, bias)
            tau_source = "selected on val: highest balanced val accuracy"
        else:
            tau_source = "given"
        for split_outputs in outputs.values():
            for prefix in ("", "odin_"):
                if f"{prefix}logits" in split_outputs:
                    split_outputs[f"{prefix}logits"] = tau_normalized_logits(
                        split_outputs[f"{prefix}features"], weight, bias, tau_normalization)

    train_counts = np.asarray(bench.train_counts)
    group_kw = {
        "many_threshold": eval_cfg["many_threshold"],
        "few_threshold": eval_cfg["few_threshold"],
        "strict": eval_cfg["strict_shots"],
    }
    if logit_adjustment == "auto":
        logit_adjustment = select_logit_adjustment(outputs["val"]["logits"],
                                                   outputs["val"]["labels"], train_counts,
                                                   group_kw)
        la_source = "selected on val: smallest τ with the best many-shot accuracy"
    else:
        la_source = "given"
    adjusted_for_scores = eval_cfg["open_score_logits"] == "decision"
    for split_outputs in outputs.values():
        split_outputs["score_logits"] = split_outputs["logits"]
        for key in ("logits", "score_logits", "odin_logits"):
            if key in split_outputs and (key == "logits" or adjusted_for_scores):
                split_outputs[key] = adjust_logits(split_outputs[key], train_counts,
                                                   logit_adjustment)
    centroids = None
    if net.meta_embedding is not None:
        centroids = net.meta_embedding.centroids.detach().float().cpu().numpy()
    return RunOutputs(
        splits=outputs, train_counts=train_counts, group_kw=group_kw, centroids=centroids,
        logit_adjustment=float(logit_adjustment), logit_adjustment_source=la_source,
        tau_normalization=float(tau_normalization), tau_normalization_source=tau_source,
        info=info, stage_cfg=stage_cfg, skipped=skipped,
    )


def perturbed_outputs(
    net: nn.Module, loader: Any, device: torch.device, temperature: float, epsilon: float
) -> dict[str, np.ndarray]:
    """Logits and features of ODIN's perturbed inputs (Liang et al. 2018, Eq. 2), float32; ε in
    the units of the normalised images."""
    net.eval()
    chunks: dict[str, list[np.ndarray]] = {"logits": [], "features": []}
    for images, _ in loader:
        perturbed = odin_perturb(lambda x: net(x)["logits"], images.to(device), temperature,
                                 epsilon)
        with torch.no_grad():
            out = net(perturbed)
        chunks["logits"].append(out["logits"].float().cpu().numpy())
        chunks["features"].append(out["features"].float().cpu().numpy())
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
) -> dict[str, dict[str, np.ndarray]]:
    """Open scores of each detector in ``names`` on each of ``splits``; detectors that learn
    are fitted on the *train* split's outputs (features, logits, labels). Reachability uses
    the model's own memory where it has one, else class means of train features."""
    options = options or {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        kwargs = dict(options.get(name, {}))
        if name == "reachability" and outputs.centroids is not None:
            kwargs.setdefault("centroids", outputs.centroids)
        detector = create_detector(name, **kwargs)
        if not detector.is_fitted:
            train = outputs.splits["train"]
            detector.fit(logits=score_logits(train), features=train["features"],
                         labels=train["labels"])
        scores[name] = {
            split: detector.score(
                logits=outputs.splits[split].get("odin_logits", score_logits(outputs.splits[split]))
                if name == "odin" else score_logits(outputs.splits[split]),  # perturbed for ODIN
                features=outputs.splits[split]["features"])
            for split in splits
        }
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
    detectors: list[str] | None = None,
    detector_options: dict[str, dict[str, Any]] | None = None,
    open_sets: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on ``data_dir``; write the report to ``output`` if given.

    ``logit_adjustment`` τ (default: the run's ``eval.logit_adjustment``) decides on
    logits + τ·log(train class frequency), see :func:`adjust_logits`; ``tau_normalization``
    (default ``eval.tau_normalization``) τ-normalises a linear classifier first.
    ``skip_bad_images`` (default: the run's ``data.skip_bad_images``) drops unreadable images
    of the evaluated splits instead of stopping; the report counts them (``skipped_images``).
    ``detectors`` (names of :mod:`oltr.detectors`) adds one open-set entry per detector under
    ``report["detectors"]``, each with its own threshold calibrated on val
    (``detector_options``: constructor arguments per detector; ODIN with ``epsilon`` > 0 runs
    its input perturbation, a backward pass per image); ``open_sets``
    (name → folder or split file) adds the same figures per external open set under
    ``report["open_sets"]``.
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
    with guard:
        return _evaluate(run_dir, data_dir, stage_cfg, started, open_set=open_set,
                         open_score=open_score, threshold=threshold, accept_rate=accept_rate,
                         device=device, output=output, skip_bad_images=skip_bad_images,
                         logit_adjustment=logit_adjustment, tau_normalization=tau_normalization,
                         detectors=detectors, detector_options=detector_options,
                         open_sets=open_sets)


def _evaluate(
    run_dir: str | Path,
    data_dir: str | Path,
    stage_cfg: dict[str, Any],
    started: float,
    *,
    open_set: bool,
    open_score: str | None,
    threshold: float | None,
    accept_rate: float | None,
    device: str,
    output: str | Path | None,
    skip_bad_images: bool | None,
    logit_adjustment: float | str | None,
    tau_normalization: float | str | None,
    detectors: list[str] | None,
    detector_options: dict[str, dict[str, Any]] | None,
    open_sets: dict[str, str | Path] | None,
) -> dict[str, Any]:
    """The body of :func:`evaluate_run`, its output checked and its run locked."""
    eval_cfg = stage_cfg["eval"]
    open_score = open_score or eval_cfg["open_score"]
    threshold = eval_cfg["threshold"] if threshold is None else threshold
    accept_rate = eval_cfg["accept_rate"] if accept_rate is None else accept_rate
    if not 0.0 < accept_rate <= 1.0:
        raise InputError("accept rate must lie in (0, 1]", value=accept_rate)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InputError("a probability threshold must lie in [0, 1]", value=threshold)
    if threshold is not None and open_score != "msp":
        raise InputError("a probability threshold applies to the msp open score only; "
                         "leave it out to calibrate on val", value=threshold)
    if open_sets and not open_set:
        raise InputError("external open sets need the open-set evaluation (drop --closed-only)")
    detectors = list(dict.fromkeys(detectors or []))
    unknown = [name for name in detectors if name not in list_detectors()]
    if unknown:
        raise InputError(f"unknown detector (valid: {', '.join(list_detectors())})",
                         value=unknown[0])
    splits = ("test", "val", "open") if open_set else ("test",)
    # detectors that learn are fitted on train outputs (reachability: unless the model has a
    # memory; the train pass is then spent for nothing, a few seconds)
    if any(create_detector(name, **(detector_options or {}).get(name, {})).fit_inputs
           for name in detectors):
        splits = (*splits, "train")
    odin = (detector_options or {}).get("odin", {})
    odin_perturbation = None
    if "odin" in detectors and odin.get("epsilon", 0.0) > 0:
        odin_perturbation = (odin.get("temperature", 1000.0), odin["epsilon"])
    outputs = collect_run_outputs(
        run_dir, data_dir, splits, open_sets=open_sets, device=device,
        skip_bad_images=skip_bad_images, logit_adjustment=logit_adjustment,
        tau_normalization=tau_normalization, odin_perturbation=odin_perturbation,
    )
    info, group_kw, train_counts = outputs.info, outputs.group_kw, outputs.train_counts
    test = outputs.splits["test"]
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
        "weights": {"stage": info["stage"], "epoch": info.get("epoch"),
                    "sha256": info["weights_sha256"]},
        "logit_adjustment": outputs.logit_adjustment,
        "logit_adjustment_source": outputs.logit_adjustment_source,
        "tau_normalization": outputs.tau_normalization,
        "tau_normalization_source": outputs.tau_normalization_source,
        "open_score_logits": eval_cfg["open_score_logits"],
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
        val, opened = outputs.splits["val"], outputs.splits.get("open")
        external = [split for split in outputs.splits if split.startswith("open:")]
        val_scores = open_scores(open_score, val, outputs.centroids)
        if threshold is not None:
            score_threshold = probability_threshold_to_msp_score(threshold)
            source = f"probability {threshold}: reject when max softmax < {threshold}"
        else:
            score_threshold = metrics.calibrate_threshold(val_scores, accept_rate)
            source = f"calibrated on val: accepts {accept_rate:.0%} of known val images"
        test_scores = open_scores(open_score, test, outputs.centroids)
        if opened is not None:
            report["open"] = {
                **open_set_figures(test, opened, test_scores,
                                   open_scores(open_score, opened, outputs.centroids),
                                   score_threshold, train_counts, group_kw),
                "threshold_source": source,
                "open_score": open_score,
            }
        if external:
            report["open_sets"] = {
                split.removeprefix("open:"): {
                    **open_set_figures(
                        test, outputs.splits[split], test_scores,
                        open_scores(open_score, outputs.splits[split], outputs.centroids),
                        score_threshold, train_counts, group_kw),
                    "threshold_source": source,
                    "open_score": open_score,
                }
                for split in external
            }
        if detectors:
            scored = detector_scores(
                detectors, outputs,
                ["val", "test", *(["open"] if opened is not None else []), *external],
                detector_options)
            report["detectors"] = {}
            report["detector_options"] = detector_options or {}
            for name, by_split in scored.items():
                cut = metrics.calibrate_threshold(by_split["val"], accept_rate)
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
