"""``oltr analyze``: the paper's further analysis (§4.3, Fig. 8) of trained runs — curves, PNG
plots and ``analysis.json`` (:func:`oltr.evaluation.analysis.analyze`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from oltr.cli.common import DefaultsHelpFormatter, default_of
from oltr.errors import InputError
from oltr.evaluation.analysis import PLOTS, analyze, parse_plots, parse_run_specs

NAME = "analyze"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr analyze`` to the ``oltr`` command's sub-parsers."""
    p = subparsers.add_parser(
        NAME, help="Fig. 8 analysis: accuracy vs longtail-ness, threshold, open classes",
        description="Plot the paper's further analysis (§4.3, Fig. 8) for trained runs, one "
                    "line per NAME: (a) longtail: accuracy vs the imbalance ratio (give each "
                    "NAME's runs on several benchmarks); (b) threshold: open-set accuracy and "
                    "F-measure vs the MSP probability threshold; (c) open-classes: the same vs "
                    "the number of open classes (threshold calibrated on val). (b) and (c) use "
                    "each NAME's run on its most imbalanced benchmark. Writes PNGs and "
                    "analysis.json to --out.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=RUN_DIR",
                   help="trained runs, e.g. plain=runs/plain oltr=runs/oltr (a NAME may repeat)")
    p.add_argument("--data", help="benchmark of every run (default: the one each run was "
                                  "trained on, from RUN_DIR/run.json)")
    p.add_argument("--out", required=True, help="output directory for the PNGs and JSON")
    p.add_argument("--plots", default=",".join(default_of(analyze, "plots")),
                   help=f"comma list of {', '.join(PLOTS)}")
    grid = default_of(analyze, "probabilities")
    p.add_argument("--probabilities", help="comma list of probability thresholds for (b) "
                                           f"(default {grid[0]:g}, {grid[1]:g}, …, {grid[-1]:g})")
    p.add_argument("--accept-rate", type=float, dest="accept_rate",
                   help="(c): the threshold accepts this fraction of known val images "
                        "(default: the run's eval.accept_rate)")
    p.add_argument("--max-subsets", type=int, default=default_of(analyze, "max_subsets"),
                   dest="max_subsets",
                   help="(c): average over at most this many open-class subsets per count")
    p.add_argument("--seed", type=int, default=default_of(analyze, "seed"),
                   help="(c): seed of the subset sample")
    p.add_argument("--device", default=default_of(analyze, "device"))
    p.set_defaults(func=run)
    return p


def probability_list(text: str) -> list[float]:
    """``"0,0.1,0.2"`` → ``[0.0, 0.1, 0.2]`` (InputError for anything else)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError("expected comma-separated probabilities, e.g. 0,0.1,0.2",
                         value=text) from None
    if not values:
        raise InputError("expected at least one probability", value=text)
    return values


def run(args: argparse.Namespace) -> int:
    """Compute and plot the Fig. 8 curves of the runs; print where they went."""
    specs = parse_run_specs(args.runs, args.data)
    plots = parse_plots(args.plots)
    probabilities = (default_of(analyze, "probabilities") if args.probabilities is None
                     else probability_list(args.probabilities))
    if args.max_subsets < 1:
        raise InputError("--max-subsets must be >= 1", value=args.max_subsets)
    result = analyze(specs, args.out, plots=plots, probabilities=probabilities,
                     accept_rate=args.accept_rate, max_subsets=args.max_subsets,
                     seed=args.seed, device=args.device)
    for plot, path in result["files"].items():
        print(f"{plot}: {path}")
    print(f"curves written to {Path(args.out) / 'analysis.json'}")
    return 0
