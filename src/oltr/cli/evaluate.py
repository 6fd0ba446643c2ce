"""``oltr evaluate``: closed- and open-set evaluation of a run → a printed table and the JSON
report (:func:`oltr.evaluation.closed_open.evaluate_run`; schema: docs/report.md)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from oltr.cli.common import (
    DefaultsHelpFormatter,
    add_odin_options,
    default_of,
    named_paths,
    odin_options,
)
from oltr.detectors import list_detectors
from oltr.evaluation.closed_open import evaluate_run
from oltr.evaluation.terminal import format_report
from oltr.run import RunDir

NAME = "evaluate"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr evaluate`` to the ``oltr`` command's sub-parsers."""
    p = subparsers.add_parser(
        NAME, help="closed- and open-set evaluation → JSON report",
        description="Evaluate a run's selected weights on the test (and open) split; print a "
                    "table and write the JSON report (schema: docs/report.md).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("run", help="run directory written by `oltr train`")
    p.add_argument("--data", required=True, help="the curated benchmark directory")
    p.add_argument("--open", action="store_true", help="also evaluate the open-set setting")
    p.add_argument("--open-score", dest="open_score",
                   help="an open-set detector (see --detector) or auto (chosen on val_open); "
                        "default: the run's decision rule")
    p.add_argument("--select", choices=["balanced_accuracy", "f_measure", "auroc"],
                   help="the val objective every auto choice maximises (f_measure and auroc "
                        "need a val_open split); default: the run's")
    p.add_argument("--threshold", type=float,
                   help="probability threshold for msp (paper: 0.1); default: the run's rule "
                        "(calibrated on val)")
    p.add_argument("--accept-rate", type=float, dest="accept_rate",
                   help="calibrated threshold accepts this fraction of known val images (0.95)")
    p.add_argument("--logit-adjustment", type=lambda v: v if v == "auto" else float(v),
                   dest="logit_adjustment",
                   help="τ: decide on logits + τ·log(train class frequency) (default: config)")
    p.add_argument("--tau-normalization", type=lambda v: v if v == "auto" else float(v),
                   dest="tau_normalization",
                   help="τ-normalise a linear classifier: w/‖w‖^τ, or auto (best val accuracy) "
                        "(default: config)")
    p.add_argument("--detector", action="append", dest="detectors", metavar="NAME",
                   help="also score with this open-set detector (repeatable): "
                        + ", ".join(list_detectors()))
    p.add_argument("--open-set", action="append", dest="open_sets", metavar="NAME=PATH",
                   help="an external open set (a folder of images or a split file), evaluated "
                        "against the known test images (repeatable; also on a benchmark "
                        "without open classes). A split file's paths are relative to its own "
                        "folder; absolute paths and '..' are allowed there, since you name the "
                        "file yourself")
    add_odin_options(p)
    p.add_argument("--shot-rule", dest="shot_rule", choices=["paper", "original"],
                   help="shot groups: paper (many > 100, few < 20 train images) or original "
                        "(the original code's >= 100 / <= 20, behind its published numbers); "
                        "default: the run's eval.strict_shots. The report's shot_rule says "
                        "which was used")
    p.add_argument("--device", default=default_of(evaluate_run, "device"))
    p.add_argument("--output", help="report path (default RUN/report.json)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted in the report) instead of stopping "
                        "(default: the run's data.skip_bad_images)")
    p.add_argument("--image-root", help="where the split files' image paths are looked up, "
                   "when the images moved since training (default: the run's data.image_root, "
                   "else the benchmark's own)")
    p.set_defaults(func=run)
    return p


def evaluate_and_print(run_dir: str | Path, data: str | Path, **kwargs: Any) -> int:
    """:func:`~oltr.evaluation.closed_open.evaluate_run` with ``kwargs``; print its table (and
    where the report went)."""
    report = evaluate_run(run_dir, data, **kwargs)
    print(format_report(report))
    if kwargs.get("output"):
        print(f"report written to {kwargs['output']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.run``; the report goes to ``--output`` or ``RUN/report.json``."""
    output = args.output or RunDir(args.run).report_path  # checked before evaluating
    return evaluate_and_print(
        args.run, args.data, open_set=args.open, open_score=args.open_score,
        threshold=args.threshold, accept_rate=args.accept_rate, device=args.device,
        logit_adjustment=args.logit_adjustment, select=args.select,
        tau_normalization=args.tau_normalization, detectors=args.detectors,
        detector_options=odin_options(args), open_sets=named_paths(args.open_sets),
        output=output, skip_bad_images=args.skip_bad_images or None,
        strict_shots=None if args.shot_rule is None else args.shot_rule == "paper",
        image_root=args.image_root)


def interrupted_hint(args: argparse.Namespace) -> str:
    """Reports are written whole or not at all."""
    return "no report was written; run the command again"
