"""Further analysis (paper §4.3, Fig. 8): how accuracy moves with (a) the dataset's longtail-ness,
(b) the open-set probability threshold and (c) the number of open classes; curves and PNG plots.

The curve functions are pure: they take a run's stored outputs
(:class:`oltr.evaluation.run_outputs.RunOutputs`) or its evaluation reports and return plain
dicts of lists (JSON-ready), so they are tested without training; each point's figures are
:func:`oltr.evaluation.open_set.open_set_at_threshold`'s. :func:`analyze` runs them over
trained runs and writes the plots (:mod:`oltr.evaluation.plots.curves`: ``fig8a_longtail.png``,
``fig8b_threshold.png``, ``fig8c_open_classes.png``, one line per method) and
``analysis.json``; ``oltr analyze`` is its command line (:mod:`oltr.cli.analyze`).

Conventions: open scores are *higher = more open* and an image is rejected iff its score exceeds
the threshold (``oltr.metrics.reject``); open-set accuracy counts a rejected known image as an
error and an accepted open image as an error; thresholds are calibrated on the known-only val
split, never on test.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oltr import metrics
from oltr.data.curation import load_manifest, load_open_classes
from oltr.errors import InputError
from oltr.evaluation.closed_open import evaluate_run
from oltr.evaluation.open_set import open_set_at_threshold
from oltr.evaluation.plots.curves import plot_longtail, plot_open_classes, plot_threshold
from oltr.evaluation.run_outputs import RunOutputs, collect_run_outputs, score_logits
from oltr.evaluation.run_outputs import open_scores as stateless_scores
from oltr.io import atomic_write_text, read_json_object
from oltr.openset import msp_score, probability_threshold_to_msp_score
from oltr.run import RUN_INFO, RunDir

PLOTS = ("longtail", "threshold", "open-classes")
PLOT_FILES = {
    "longtail": "fig8a_longtail.png",
    "threshold": "fig8b_threshold.png",
    "open-classes": "fig8c_open_classes.png",
}
DEFAULT_PROBABILITIES = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, …, 0.95
DEFAULT_MAX_SUBSETS = 20
POINT_KEYS = ("overall", "many", "medium", "few", "f_measure", "precision", "recall",
              "known_acceptance_rate", "open_rejection_rate")


# --------------------------------------------------------------------------- curves


def _point(
    known_predictions: np.ndarray, known_labels: np.ndarray, known_scores: np.ndarray,
    open_predictions: np.ndarray, open_scores: np.ndarray, threshold: float,
    outputs: RunOutputs,
) -> dict[str, Any]:
    """The :data:`POINT_KEYS` figures of known + open test images at one score threshold
    (``open_*`` may be empty: the known-only case of Fig. 8c's zero open classes)."""
    figures = open_set_at_threshold(known_predictions, known_labels, known_scores,
                                    open_predictions, open_scores, threshold,
                                    outputs.train_counts, outputs.group_kw)
    return {key: figures[key] for key in POINT_KEYS}


def _split(outputs: RunOutputs, name: str) -> dict[str, np.ndarray]:
    if name not in outputs.splits:
        raise InputError(f"the run outputs hold no '{name}' split (collect it with "
                         "collect_run_outputs(..., splits=('test', 'val', 'open')))", value=name)
    return outputs.splits[name]


def threshold_curve(
    outputs: RunOutputs, probabilities: Sequence[float] = DEFAULT_PROBABILITIES
) -> dict[str, Any]:
    """Open-set accuracy and F-measure per MSP probability threshold p (paper §4.3, Fig. 8b).

    An image is rejected as unknown when its max softmax probability is below p (open score
    1 − max softmax above 1 − p); p = 0 rejects nothing, and with K classes neither does any
    p ≤ 1/K. Uses the known ``test`` and the ``open`` split of ``outputs``. Returns lists
    aligned with the sorted, de-duplicated ``probabilities`` (keys of :data:`POINT_KEYS`),
    plus ``closed_overall`` (the closed-set accuracy, the p = 0 limit on known images) and
    ``num_classes``.
    """
    grid = sorted({float(p) for p in probabilities})
    if not grid:
        raise InputError("give at least one probability threshold")
    test, opened = _split(outputs, "test"), _split(outputs, "open")
    known_predictions = test["logits"].argmax(axis=1)
    open_predictions = opened["logits"].argmax(axis=1)
    known_scores = np.asarray(msp_score(score_logits(test)), dtype=np.float64)
    open_scores = np.asarray(msp_score(score_logits(opened)), dtype=np.float64)
    curve: dict[str, Any] = {"probability": grid, "score_threshold": []}
    curve |= {key: [] for key in POINT_KEYS}
    for probability in grid:
        threshold = probability_threshold_to_msp_score(probability)
        point = _point(known_predictions, test["labels"], known_scores, open_predictions,
                       open_scores, threshold, outputs)
        curve["score_threshold"].append(threshold)
        for key in POINT_KEYS:
            curve[key].append(point[key])
    curve["closed_overall"] = float((known_predictions == test["labels"]).mean())
    curve["num_classes"] = int(test["logits"].shape[1])
    return curve


def class_subsets(
    num_classes: int, k: int, max_subsets: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """Every k-subset of ``range(num_classes)`` when there are at most ``max_subsets``, else
    ``max_subsets`` distinct ones drawn at random (seeded by ``rng``); each sorted."""
    if not 0 <= k <= num_classes:
        raise InputError(f"k must lie in [0, {num_classes}]", value=k)
    if max_subsets < 1:
        raise InputError("max_subsets must be >= 1", value=max_subsets)
    if math.comb(num_classes, k) <= max_subsets:
        return list(itertools.combinations(range(num_classes), k))
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < max_subsets:
        subset = tuple(sorted(int(i) for i in rng.choice(num_classes, size=k, replace=False)))
        chosen.setdefault(subset)
    return list(chosen)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present))


def open_classes_curve(
    outputs: RunOutputs,
    open_class_of_each_open_image: Sequence[int] | np.ndarray,
    *,
    num_open_classes: int | None = None,
    accept_rate: float = 0.95,
    open_score: str | None = None,
    max_subsets: int = DEFAULT_MAX_SUBSETS,
    seed: int = 0,
) -> dict[str, Any]:
    """Open-set accuracy and F-measure vs the number k of open classes in the test set
    (paper §4.3, Fig. 8c), k = 0 … number of open classes.

    ``open_class_of_each_open_image[i]`` is the open class (an index) of the i-th image of the
    ``open`` split (``oltr.data.curation.load_open_classes``). For each k the test set is the
    known ``test`` split plus the open images of a subset of k open classes; the figures are
    averaged over every such subset (or ``max_subsets`` seeded random ones when there are
    more; ``*_std`` is their standard deviation). The threshold is fixed for all k: it accepts
    ``accept_rate`` of the known *val* images (``metrics.calibrate_threshold``), under the open
    score ``open_score`` (a stateless score of ``oltr.openset``; None: the run's own decision
    rule's open score, ``outputs.splits[split]["open_score"]``). k = 0 gives the known-only
    figures.
    """
    def split_scores(split: dict[str, np.ndarray]) -> np.ndarray:
        if open_score is None:
            if "open_score" not in split:
                raise InputError("the run outputs hold no open scores of the run's decision "
                                 "rule; name a stateless open score (msp, energy, …)")
            return np.asarray(split["open_score"], dtype=np.float64)
        return stateless_scores(open_score, split, outputs.centroids)

    test, val, opened = _split(outputs, "test"), _split(outputs, "val"), _split(outputs, "open")
    classes = np.asarray(open_class_of_each_open_image)
    if classes.ndim != 1 or len(classes) != len(opened["labels"]):
        raise InputError(f"open_class_of_each_open_image must give one class per open image "
                         f"({len(opened['labels'])}), got shape {classes.shape}")
    if len(classes) and not np.issubdtype(classes.dtype, np.integer):
        raise InputError(f"open classes must be integer indices, got dtype {classes.dtype}")
    classes = classes.astype(np.int64)
    if len(classes) and classes.min() < 0:
        raise InputError("open class indices must be >= 0", value=int(classes.min()))
    present = int(classes.max()) + 1 if len(classes) else 0
    if num_open_classes is None:
        num_open_classes = present
    elif num_open_classes < present:
        raise InputError(f"open class index {present - 1} is out of range for "
                         f"num_open_classes={num_open_classes}", value=num_open_classes)
    threshold = metrics.calibrate_threshold(split_scores(val), accept_rate)
    known_predictions = test["logits"].argmax(axis=1)
    known_scores = split_scores(test)
    open_predictions = opened["logits"].argmax(axis=1)
    open_scores_ = split_scores(opened) if len(classes) else np.zeros(0)
    rng = np.random.Generator(np.random.PCG64(seed))
    curve: dict[str, Any] = {"num_open_classes": [], "num_subsets": [], "num_open_images": []}
    curve |= {key: [] for key in POINT_KEYS} | {f"{key}_std": [] for key in POINT_KEYS}
    for k in range(num_open_classes + 1):
        subsets = class_subsets(num_open_classes, k, max_subsets, rng)
        points, sizes = [], []
        for subset in subsets:
            chosen = np.isin(classes, subset)
            points.append(_point(known_predictions, test["labels"], known_scores,
                                 open_predictions[chosen], open_scores_[chosen], threshold,
                                 outputs))
            sizes.append(int(chosen.sum()))
        curve["num_open_classes"].append(k)
        curve["num_subsets"].append(len(subsets))
        curve["num_open_images"].append(float(np.mean(sizes)))
        for key in POINT_KEYS:
            mean, std = _mean_std([point[key] for point in points])
            curve[key].append(mean)
            curve[f"{key}_std"].append(std)
    used = open_score or (outputs.rule.open_score if outputs.rule is not None else "run's own")
    curve |= {"threshold": threshold, "accept_rate": accept_rate, "open_score": used,
              "num_known_images": len(test["labels"])}
    return curve


def _group_mean(per_class: Sequence[float | None], members: Sequence[int]) -> float | None:
    values = [per_class[i] for i in members if per_class[i] is not None]
    return float(np.mean(values)) if values else None


def longtail_curve(
    points: Sequence[tuple[float, Mapping[str, Any]]],
    *,
    train_counts: Sequence[Sequence[int]] | None = None,
    tail_fraction: float = 1 / 3,
) -> dict[str, Any]:
    """Accuracy vs the imbalance ratio max/min of the train class counts (paper §4.3, Fig. 8a;
    the paper varies the Pareto α of ImageNet-LT, we vary the ratio of an exp profile).

    ``points``: (imbalance ratio, evaluation report of
    ``oltr.evaluation.closed_open.evaluate_run``) pairs, sorted here by ratio. Besides the
    reports' closed many/medium/few/overall and open overall/F-measure/AUROC, gives
    ``closed_head`` / ``closed_tail``: the mean per-class accuracy of the ``tail_fraction``
    most / least frequent classes. Shot groups (many > 100, few < 20 images) are empty at low
    imbalance, the rank-based head and tail are defined at every ratio. Class frequency order:
    ``train_counts`` (one list per point) where given, else the label order (curated
    benchmarks give label 0 to the largest class).
    """
    if not points:
        raise InputError("the longtail curve needs at least one (ratio, report) point")
    if train_counts is not None and len(train_counts) != len(points):
        raise InputError(f"train_counts must give one list per point ({len(points)}), "
                         f"got {len(train_counts)}")
    if not 0 < tail_fraction <= 0.5:
        raise InputError("tail_fraction must lie in (0, 0.5]", value=tail_fraction)
    order = sorted(range(len(points)), key=lambda i: float(points[i][0]))
    keys = ("imbalance_ratio", "closed_overall", "closed_many", "closed_medium", "closed_few",
            "closed_head", "closed_tail", "open_overall", "open_f_measure", "open_auroc")
    curve: dict[str, Any] = {key: [] for key in keys}
    for i in order:
        ratio, report = points[i]
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 1):
            raise InputError("an imbalance ratio must be a finite number >= 1", value=ratio)
        closed, opened = report["closed"], report.get("open", {})
        per_class = closed["per_class"]
        if train_counts is not None:
            counts = list(train_counts[i])
            if len(counts) != len(per_class):
                raise InputError(f"point {i}: {len(counts)} train counts for "
                                 f"{len(per_class)} classes")
            by_frequency = sorted(range(len(counts)), key=lambda c: -counts[c])
        else:
            by_frequency = list(range(len(per_class)))
        size = max(1, round(len(per_class) * tail_fraction))
        curve["imbalance_ratio"].append(float(ratio))
        for group in ("overall", "many", "medium", "few"):
            curve[f"closed_{group}"].append(closed.get(group))
        curve["closed_head"].append(_group_mean(per_class, by_frequency[:size]))
        curve["closed_tail"].append(_group_mean(per_class, by_frequency[-size:]))
        curve["open_overall"].append(opened.get("overall"))
        curve["open_f_measure"].append(opened.get("f_measure"))
        curve["open_auroc"].append(opened.get("auroc"))
    curve["tail_fraction"] = tail_fraction
    return curve


def imbalance_ratio(data_dir: str | Path) -> float:
    """max / min train images per class of a curated benchmark (from its manifest)."""
    counts = load_manifest(data_dir)["counts"]["train"]
    if not counts or min(counts) <= 0:
        raise InputError("manifest train counts must be positive", path=Path(data_dir),
                         value=counts)
    return float(max(counts) / min(counts))


def json_ready(value: Any) -> Any:
    """Curves as JSON: numpy numbers → Python, floats rounded to 6 digits, NaN → None."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class RunSpec:
    """One trained run to analyse: the method name it is plotted under, and its data."""

    name: str
    run_dir: Path
    data_dir: Path


def trained_data_dir(run_dir: str | Path) -> Path:
    """The benchmark a run was trained on, as recorded in ``RUN/run.json``.

    Raises:
        InputError: naming ``run.json`` when it is missing, damaged or names no data.
    """
    run = RunDir(run_dir)
    if not run.info_path.is_file():
        raise InputError(f"not an oltr run directory (no {RUN_INFO}); give --data",
                         path=run.info_path)
    if run.data_dir is None:
        raise InputError("run description names no data directory; give --data",
                         path=run.info_path)
    return run.data_dir


def parse_run_specs(values: Sequence[str], data_dir: str | Path | None = None) -> list[RunSpec]:
    """``NAME=RUN_DIR`` strings → run specs; the data is ``data_dir`` or each run's own
    (``RUN/run.json``). A name may repeat (runs of one method on several benchmarks)."""
    specs = []
    for value in values:
        name, sep, run = value.partition("=")
        if not sep or not name.strip() or not run.strip():
            raise InputError("expected NAME=RUN_DIR, e.g. plain=runs/plain", value=value)
        run_dir = Path(run.strip())
        if not run_dir.is_dir():
            raise InputError("run directory not found", path=run_dir)
        data = Path(data_dir) if data_dir is not None else trained_data_dir(run_dir)
        if not data.is_dir():
            raise InputError("benchmark directory not found", path=data)
        specs.append(RunSpec(name.strip(), run_dir, data))
    if not specs:
        raise InputError("give at least one run (NAME=RUN_DIR)")
    return specs


def parse_plots(text: str | Sequence[str]) -> list[str]:
    """``"threshold,open-classes"`` → checked plot names (valid: :data:`PLOTS`)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in PLOTS]
    if unknown or not names:
        raise InputError(f"unknown plot (valid: {', '.join(PLOTS)})",
                         value=unknown[0] if unknown else text)
    return names


def check_analysis_output(out_dir: Path, plot_files: Sequence[str]) -> None:
    """InputError unless every file :func:`analyze` writes into ``out_dir`` (``analysis.json``
    and ``plot_files``) is absent or was written there by an earlier analysis: one listed in
    the ``files`` of an ``analysis.json`` of oltr's shape in ``out_dir``. A user's file of the
    same name is never replaced (the error names it)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("the analysis output exists and is not a directory", path=out_dir)
    index = out_dir / "analysis.json"
    owned: set[str] = set()
    if index.exists():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if not (isinstance(data, dict) and {"runs", "curves", "files"} <= set(data)
                and isinstance(data["files"], dict)):
            raise InputError("analysis.json there was not written by oltr analyze; it is not "
                             "overwritten: choose another --out", path=index)
        owned = {"analysis.json", *(Path(str(f)).name for f in data["files"].values())}
    for name in plot_files:
        if (out_dir / name).exists() and name not in owned:
            raise InputError("a file of that name there was not written by oltr analyze; it is "
                             "not overwritten: choose another --out", path=out_dir / name)


def analyze(
    runs: Sequence[RunSpec],
    out_dir: str | Path,
    *,
    plots: Sequence[str] = ("threshold", "open-classes"),
    probabilities: Sequence[float] = DEFAULT_PROBABILITIES,
    accept_rate: float | None = None,
    max_subsets: int = DEFAULT_MAX_SUBSETS,
    seed: int = 0,
    device: str = "auto",
    reports: Mapping[Path, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Compute the Fig. 8 curves of ``runs`` (paper §4.3) and write their PNGs and
    ``analysis.json`` into ``out_dir``; return what ``analysis.json`` holds.

    ``longtail`` needs each method's runs on two or more benchmarks (its imbalance ratio read
    from the manifest); their reports come from ``reports`` (keyed by run directory) or
    ``evaluate_run``. ``threshold`` and ``open-classes`` use, per method, its run on the most
    imbalanced benchmark. ``accept_rate`` (default: the run's ``eval.accept_rate``) calibrates
    Fig. 8c's threshold on val; its open score is the run's decision rule's (``RUN/decision.json``).
    """
    plots = parse_plots(plots)
    if accept_rate is not None and not 0.0 < accept_rate <= 1.0:
        raise InputError("accept rate must lie in (0, 1]", value=accept_rate)
    by_name: dict[str, list[RunSpec]] = {}
    for spec in runs:
        by_name.setdefault(spec.name, []).append(spec)
    ratios = {spec.data_dir: imbalance_ratio(spec.data_dir) for spec in runs}
    out_dir = Path(out_dir)
    check_analysis_output(out_dir, [PLOT_FILES[p] for p in plots])
    result: dict[str, Any] = {"runs": [{"name": s.name, "run": str(s.run_dir),
                                        "data": str(s.data_dir),
                                        "imbalance_ratio": ratios[s.data_dir]} for s in runs],
                              "curves": {}, "files": {}}
    if "longtail" in plots:
        curves = _longtail_curves(by_name, ratios, reports, device)
        result["curves"]["longtail"] = curves
        result["files"]["longtail"] = str(plot_longtail(curves, out_dir / PLOT_FILES["longtail"]))
    wanted = [p for p in plots if p != "longtail"]
    if wanted:
        chosen = {name: max(specs, key=lambda s: ratios[s.data_dir])  # first of the most
                  for name, specs in by_name.items()}                   # imbalanced (stable)
        result["selected"] = {name: str(spec.run_dir) for name, spec in chosen.items()}
        threshold_curves, open_curves = {}, {}
        for name, spec in chosen.items():
            curves = _run_curves(spec, wanted, probabilities=probabilities,
                                 accept_rate=accept_rate, max_subsets=max_subsets, seed=seed,
                                 device=device)
            if "threshold" in curves:
                threshold_curves[name] = curves["threshold"]
            if "open-classes" in curves:
                open_curves[name] = curves["open-classes"]
        if threshold_curves:
            result["curves"]["threshold"] = threshold_curves
            result["files"]["threshold"] = str(
                plot_threshold(threshold_curves, out_dir / PLOT_FILES["threshold"]))
        if open_curves:
            result["curves"]["open-classes"] = open_curves
            result["files"]["open-classes"] = str(
                plot_open_classes(open_curves, out_dir / PLOT_FILES["open-classes"]))
    result = json_ready(result)
    atomic_write_text(out_dir / "analysis.json", json.dumps(result, indent=2) + "\n")
    return result


def _longtail_curves(by_name: Mapping[str, Sequence[RunSpec]], ratios: Mapping[Path, float],
                     reports: Mapping[Path, Mapping[str, Any]] | None,
                     device: str) -> dict[str, Any]:
    """Fig. 8a's curve per method, from its runs' evaluation reports (``reports``, else
    evaluated here) on benchmarks of two or more imbalance ratios."""
    curves = {}
    for name, specs in by_name.items():
        if len({ratios[s.data_dir] for s in specs}) < 2:
            raise InputError(f"the longtail plot needs runs of '{name}' on two or more "
                             "benchmarks of different imbalance ratios", value=name)
        points, counts = [], []
        for spec in specs:
            report = (reports or {}).get(spec.run_dir)
            if report is None:
                report = evaluate_run(spec.run_dir, spec.data_dir, open_set=True,
                                      device=device)
            points.append((ratios[spec.data_dir], report))
            counts.append(read_json_object(spec.data_dir / "manifest.json",
                                           "manifest")["counts"]["train"])
        curves[name] = longtail_curve(points, train_counts=counts)
    return curves


def _run_curves(spec: RunSpec, wanted: Sequence[str], *, probabilities: Sequence[float],
                accept_rate: float | None, max_subsets: int, seed: int,
                device: str) -> dict[str, Any]:
    """Fig. 8b's and 8c's curves (those ``wanted``) of one run, from one forward pass."""
    outputs = collect_run_outputs(spec.run_dir, spec.data_dir, ("test", "val", "open"),
                                  device=device)
    curves: dict[str, Any] = {}
    if "threshold" in wanted:
        curves["threshold"] = threshold_curve(outputs, probabilities)
    if "open-classes" in wanted:
        class_names, of_image = load_open_classes(spec.data_dir)
        eval_cfg = outputs.stage_cfg["eval"]
        curves["open-classes"] = open_classes_curve(
            outputs, of_image, num_open_classes=len(class_names),
            accept_rate=eval_cfg["accept_rate"] if accept_rate is None else accept_rate,
            max_subsets=max_subsets, seed=seed)
        curves["open-classes"]["open_classes"] = class_names
    return curves
