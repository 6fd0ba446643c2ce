"""``oltr bench``: methods × open-set detectors × seeds on one or several benchmarks → Markdown
and JSON tables (:func:`oltr.bench.run_bench`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from oltr.bench import QUICK_EPOCHS, run_bench
from oltr.cli.common import (
    DefaultsHelpFormatter,
    add_odin_options,
    comma_list,
    default_of,
    named_paths,
    odin_options,
)
from oltr.config import list_benchmarks
from oltr.errors import InputError
from oltr.io import read_text

NAME = "bench"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr bench`` to the ``oltr`` command's sub-parsers."""
    p = subparsers.add_parser(
        NAME, help="compare methods × open-set detectors × seeds → Markdown + JSON tables",
        description="Train (or reuse) and evaluate every method preset for every seed on one "
                    "curated benchmark; write OUT/results.md (Tab. 3- and Tab. 2-style tables, "
                    "mean ± std over seeds) and OUT/results.json. Identical stages (the plain "
                    "stage 1 of two-stage methods) train once; a killed bench resumes.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, action="append",
                   help="a curated benchmark directory; repeat it for the reporting protocol's "
                        "curations (--seeds then gives one training seed per benchmark)")
    p.add_argument("--out", required=True, help="bench directory (runs, stage cache, results)")
    p.add_argument("--methods", default=",".join(default_of(run_bench, "methods")),
                   help="comma-separated method presets")
    p.add_argument("--detectors", default=",".join(default_of(run_bench, "detectors")),
                   help="comma-separated open-set detectors")
    p.add_argument("--seeds", default=",".join(str(s) for s in default_of(run_bench, "seeds")),
                   help="comma-separated training seeds")
    p.add_argument("--epochs", type=int,
                   help="total epochs of every method (stages keep their shares); default: "
                        f"each preset's own (30 on fmnist_lt), {QUICK_EPOCHS} with --quick")
    p.add_argument("--benchmark", default=default_of(run_bench, "benchmark"),
                   help=f"preset family ({', '.join(list_benchmarks())})")
    p.add_argument("--open-set", action="append", dest="open_sets", metavar="NAME=PATH",
                   help="an external open set (folder or split file), repeatable")
    add_odin_options(p)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: width-8 networks, 3 steps per epoch, {QUICK_EPOCHS} epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides applied to every method")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the bench; print its tables (exit status 1 when a run failed)."""
    try:
        seeds = [int(seed) for seed in comma_list(args.seeds)]
    except ValueError:
        raise InputError("--seeds must be comma-separated integers", value=args.seeds) from None
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)
    results = run_bench(
        args.data if len(args.data) > 1 else args.data[0], args.out,
        methods=comma_list(args.methods),
        detectors=comma_list(args.detectors), seeds=seeds, epochs=epochs,
        overrides=args.overrides, benchmark=args.benchmark,
        open_sets=named_paths(args.open_sets), quick=args.quick,
        detector_options=odin_options(args), progress=not args.no_progress,
    )
    print(read_text(Path(args.out) / "results.md", "bench results"))
    print(f"bench finished in {results['wall_seconds'] / 60:.1f} min; tables in "
          f"{Path(args.out) / 'results.md'}, every figure in {Path(args.out) / 'results.json'}")
    if results["failures"]:
        print(f"oltr bench: {len(results['failures'])} run(s) failed (listed under 'Failed "
              "runs'); the others are in the tables", file=sys.stderr)
        return 1
    return 0


def interrupted_hint(args: argparse.Namespace) -> str:
    """A bench resumes from what it kept."""
    return "finished stages and reports are kept; run the same command to continue"
