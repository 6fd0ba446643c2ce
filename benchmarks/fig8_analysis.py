"""The paper's further analysis (§4.3, Fig. 8) on Fashion-MNIST-LT, plain model vs OLTR.

    python benchmarks/fig8_analysis.py            # 3 longtail levels, one seed
    python benchmarks/fig8_analysis.py --quick    # a smoke run: tiny model, a few steps, ~25 s

The default run trains 6 models, ~22 000 train images per epoch over the three levels
(estimated 8-10 min on 2 CPU cores, from ~9 s per epoch of 6 500 images).

1. Curates Fashion-MNIST-LT at three longtail levels under ``OUT/data/``: 6 known + 4 open
   classes (curation seed 1, a reporting-protocol seed — the development curation's seed 0 is
   where choices are made — and the same classes at every level), exp profile 4000 → 400 / 40 /
   5 train images per class (imbalance ratio 10 / 100 / 800), 100 val images per class, all test
   images (1 000 per known and per open class).
2. Trains the plain model (8 epochs) and OLTR (stage 1 6 epochs + stage 2 2 epochs with the
   backbone frozen, as the paper does for this analysis "for faster investigating") on each
   level, one training seed. Finished runs are reused, killed ones resumed.
3. Evaluates every run (closed + open set, threshold calibrated on val) and draws
   ``fig8a_longtail.png`` (accuracy vs imbalance ratio), ``fig8b_threshold.png`` (open-set
   accuracy vs the MSP probability threshold) and ``fig8c_open_classes.png`` (vs the number of
   open classes, 0–4, averaged over every subset of open classes); (b) and (c) use the runs on
   the most imbalanced level (ratio 800, the default benchmark's). Writes ``results.json``
   (settings, reports, curves) and ``results.md`` into OUT (default ``runs/fig8``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from oltr.bench import machine_description
from oltr.config import load_config, load_saved_config
from oltr.data import curate, load_manifest
from oltr.data.curation import OPEN_CLASSES_NAME
from oltr.errors import InputError
from oltr.evaluation.analysis import PLOT_FILES, RunSpec, analyze, imbalance_ratio
from oltr.evaluation.closed_open import evaluate_run
from oltr.io import read_json_object
from oltr.pipeline import train_run

CURATION = {"seed": 1, "known": 6, "open": 4, "profile": "exp", "max_count": 4000,
            "val_per_class": 100}
MIN_COUNTS = (400, 40, 5)
# --quick: a small benchmark (100 test images per class) and a tiny model for a few steps
QUICK_CURATION = {"max_count": 400, "test_per_class": 100, "open_per_class": 100}
QUICK_MIN_COUNTS = (40, 10, 4)
QUICK = ["model.width=8", "train.max_steps_per_epoch=3", "eval.batch_size=512"]
REPORT = "report-fig8.json"


def curate_level(out: Path, min_count: int, quick: bool) -> Path:
    """The benchmark of one longtail level (curated once; re-curated when it predates
    ``open_classes.txt``)."""
    settings = {**CURATION, **(QUICK_CURATION if quick else {}), "min_count": min_count}
    data = out / "data" / f"fmnist-lt-6k4o-exp{settings['max_count']}-{min_count}"
    if (data / "manifest.json").exists():
        manifest = load_manifest(data)
        if OPEN_CLASSES_NAME in manifest["files"]:
            return data
    curate("fashion-mnist", data, force=True, **settings)
    return data


def run_method(method: str, data: Path, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train (or reuse, or resume) one run and return its evaluation report (cached)."""
    report_path = run_dir / REPORT
    config = load_config(method, overrides=overrides)
    saved = run_dir / "config.yaml"
    if saved.exists() and load_saved_config(saved) != config:
        raise InputError("this run was trained with other settings; choose another --out "
                         "(or delete the run)", path=run_dir)
    if report_path.exists():
        return read_json_object(report_path, "evaluation report")
    started = time.perf_counter()
    train_run(config, data, run_dir, resume=run_dir.exists(), progress=False)
    seconds = time.perf_counter() - started
    report = evaluate_run(run_dir, data, open_set=True)
    report["train_seconds"] = seconds
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(result: dict[str, Any], header: str) -> str:
    """The three curves as Markdown tables (accuracies in percent)."""
    curves = result["curves"]
    lines = [header, "", ("## (a) longtail-ness (closed set; open set at the val-calibrated "
             "threshold)"), "",
             ("| method | imbalance ratio | closed overall | head third | tail third | many | "
             "medium | few | open overall | open F-measure | open AUROC |"),
             "|" + " --- |" * 11]
    for name, curve in curves.get("longtail", {}).items():
        for i, ratio in enumerate(curve["imbalance_ratio"]):
            cells = [f"{ratio:g}", *(_pct(curve[k][i]) for k in (
                "closed_overall", "closed_head", "closed_tail", "closed_many", "closed_medium",
                "closed_few", "open_overall")), _f(curve["open_f_measure"][i]),
                _pct(curve["open_auroc"][i])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    threshold = curves.get("threshold", {})
    if threshold:
        names = list(threshold)
        lines += ["", "## (b) open-set probability threshold (reject if max softmax < p)", "",
                  "| p | " + " | ".join(f"{n} open overall | {n} F-measure | {n} known accepted"
                                         for n in names) + " |",
                  "|" + " --- |" * (1 + 3 * len(names))]
        for i, p in enumerate(threshold[names[0]]["probability"]):
            cells = [f"{p:g}"]
            for n in names:
                curve = threshold[n]
                cells += [_pct(curve["overall"][i]), _f(curve["f_measure"][i]),
                          _pct(curve["known_acceptance_rate"][i])]
            lines.append("| " + " | ".join(cells) + " |")
    opened = curves.get("open-classes", {})
    if opened:
        names = list(opened)
        lines += ["", ("## (c) number of open classes (threshold calibrated on val; mean ± std "
                  "over subsets of open classes)"), "",
                  "| open classes | subsets | " + " | ".join(
                      f"{n} open overall | {n} F-measure" for n in names) + " |",
                  "|" + " --- |" * (2 + 2 * len(names))]
        first = opened[names[0]]
        for i, k in enumerate(first["num_open_classes"]):
            cells = [str(k), str(first["num_subsets"][i])]
            for n in names:
                curve = opened[n]
                cells += [f"{_pct(curve['overall'][i])} ± {_pct(curve['overall_std'][i])}",
                          f"{_f(curve['f_measure'][i])} ± {_f(curve['f_measure_std'][i])}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/fig8"))
    parser.add_argument("--seed", type=int, default=1, help="training seed")
    parser.add_argument("--min-counts", type=int, nargs="+", dest="min_counts",
                        help=f"tail-class train images per level (default {MIN_COUNTS})")
    parser.add_argument("--plain-epochs", type=int, default=8, dest="plain_epochs")
    parser.add_argument("--stage1-epochs", type=int, default=6, dest="stage1_epochs")
    parser.add_argument("--stage2-epochs", type=int, default=2, dest="stage2_epochs")
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps, a small "
                                                             "benchmark (a smoke run)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for both methods (e.g. model.width=16)")
    args = parser.parse_args()
    if args.quick:
        if args.out == parser.get_default("out"):
            args.out = Path("runs/fig8-quick")
        args.plain_epochs, args.stage1_epochs, args.stage2_epochs = 2, 1, 1
    min_counts = args.min_counts or (QUICK_MIN_COUNTS if args.quick else MIN_COUNTS)
    common = [f"seed={args.seed}", *(QUICK if args.quick else []), *args.overrides]
    plain = [*common, f"train.epochs={args.plain_epochs}"]
    oltr = [*common, f"stage1.train.epochs={args.stage1_epochs}",
            f"stage2.train.epochs={args.stage2_epochs}", "stage2.train.freeze_backbone=true"]

    started = time.perf_counter()
    specs, reports = [], {}
    for min_count in min_counts:
        data = curate_level(args.out, min_count, args.quick)
        ratio = imbalance_ratio(data)
        for method, overrides in (("plain", plain), ("oltr", oltr)):
            run_dir = args.out / "runs" / f"{method}-ratio{ratio:g}-seed{args.seed}"
            report = run_method(method, data, run_dir, overrides)
            reports[run_dir] = report
            specs.append(RunSpec(method, run_dir, data))
            print(f"ratio {ratio:g} {method}: closed {report['closed']['overall']:.3f} "
                  f"(many {_f(report['closed']['many'])}, few {_f(report['closed']['few'])}), "
                  f"open F {report['open']['f_measure']:.3f}, "
                  f"AUROC {report['open']['auroc']:.3f}", flush=True)
    result = analyze(specs, args.out, plots=["longtail", "threshold", "open-classes"],
                     reports=reports)
    minutes = (time.perf_counter() - started) / 60
    machine = machine_description()
    header = (f"# Fig. 8 analysis on Fashion-MNIST-LT (6 known + 4 open classes, exp profile "
              f"max {CURATION['max_count'] if not args.quick else QUICK_CURATION['max_count']} "
              f"→ min {', '.join(map(str, min_counts))}), training seed {args.seed}"
              f"{' (--quick)' if args.quick else ''}\n\n"
              f"plain {args.plain_epochs} epochs; OLTR {args.stage1_epochs} + "
              f"{args.stage2_epochs} epochs, stage 2 with the backbone frozen. Accuracies in "
              f"percent. Plots: {', '.join(PLOT_FILES.values())}. Wall time {minutes:.1f} min "
              f"(reused runs count 0) on {machine}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown(result, header))
    (args.out / "results.json").write_text(json.dumps({
        "settings": {"curation": {**CURATION, **(QUICK_CURATION if args.quick else {})},
                     "min_counts": list(min_counts), "seed": args.seed,
                     "plain_overrides": plain, "oltr_overrides": oltr, "quick": args.quick},
        "wall_minutes": minutes, "machine": machine,
        "reports": {str(path): report for path, report in reports.items()},
        **result}, indent=2) + "\n")
    print(markdown(result, header))
    for path in result["files"].values():
        print(f"wrote {path}")
    print(f"wall time {minutes:.1f} min ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
