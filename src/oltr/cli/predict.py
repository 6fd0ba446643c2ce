"""``oltr predict``: classify new images with a trained run and its decision rule, or answer
'unknown' (:class:`oltr.predict.Predictor`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from oltr.cli.common import DefaultsHelpFormatter, default_of
from oltr.errors import InputError, display_path
from oltr.predict import Predictor, expand_inputs

NAME = "predict"

#: Output formats; the first is the default.
FORMATS = ("table", "jsonl", "csv")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr predict`` to the ``oltr`` command's sub-parsers."""
    p = subparsers.add_parser(
        NAME, help="classify new images, or answer 'unknown'",
        description="Predict the class of images with a trained run and its decision rule "
                    "(fitted on val when it was trained): an image whose open score exceeds "
                    "the threshold is answered 'unknown'. Folders are searched recursively; "
                    "an unreadable file is reported on stderr and the others go on (exit "
                    "status 1 then).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("images", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--format", choices=list(FORMATS), default=FORMATS[0], help="output format")
    p.add_argument("--threshold", type=float,
                   help="as in `oltr evaluate`: a probability for the msp open score — 'unknown' "
                        "when the top probability is below it (paper: 0.1); an error for a "
                        "rule with another open score (default: the run's decision rule)")
    p.add_argument("--open-threshold", type=float, dest="open_threshold",
                   help="the threshold in the rule's open-score units: 'unknown' when the open "
                        "score exceeds it (default: the run's decision rule)")
    p.add_argument("--top-k", type=int, default=default_of(Predictor.predict, "top_k"),
                   dest="top_k", help="classes listed per image")
    p.add_argument("--batch-size", type=int, default=default_of(Predictor.predict, "batch_size"),
                   dest="batch_size")
    p.add_argument("--device", default=default_of(Predictor.from_run, "device"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Predict every image; skipped (unreadable) ones are named on stderr (exit status 1)."""
    if args.top_k < 1:
        raise InputError("--top-k must be >= 1", value=args.top_k)
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1", value=args.batch_size)
    if args.threshold is not None and args.open_threshold is not None:
        raise InputError("give --threshold (an msp probability) or --open-threshold (in the "
                         "open score's units), not both")
    predictor = Predictor.from_run(args.run, device=args.device, threshold=args.open_threshold)
    if args.threshold is not None:
        predictor.use_msp_probability(args.threshold)
    rows = [row.as_dict() for row in predictor.predict(expand_inputs(args.images),
                                                       batch_size=args.batch_size,
                                                       top_k=args.top_k)]
    for stream in (sys.stdout, sys.stderr):  # a class name or path the locale cannot encode
        if hasattr(stream, "reconfigure"):  # is shown as \xNN / \uNNNN, not a traceback
            stream.reconfigure(errors="backslashreplace")
    failed = [row for row in rows if row["error"] is not None]
    for row in failed:
        print(f"oltr predict: skipped: {row['error']}", file=sys.stderr)
    print_predictions(rows, args.format, sys.stdout)
    return 1 if failed else 0


def print_predictions(rows: list[dict[str, Any]], form: str, stream: Any) -> None:
    """Predictions as an aligned table, JSON lines, or CSV (``top_k`` as ``name:p;…``). Paths
    are shown by :func:`oltr.errors.display_path` in the table and CSV (one row per image,
    whatever its name); JSON lines keep them exact (JSON escapes them)."""
    def top(row: dict[str, Any]) -> str:
        return ";".join(f"{item['label_name']}:{item['probability']:.4f}"
                        for item in row["top_k"] or [])

    if form == "jsonl":
        for row in rows:
            stream.write(json.dumps(row) + "\n")
        return
    columns = ("path", "label_name", "label", "confidence", "open_score", "threshold",
               "closed_set_label", "top_k", "error")
    if form == "csv":
        import csv

        writer = csv.writer(stream)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([top(row) if key == "top_k" else "" if row[key] is None else
                             display_path(row[key]) if key == "path" else row[key]
                             for key in columns])
        return
    ok = [row for row in rows if row["error"] is None]
    if not ok:
        return
    paths = [display_path(row["path"]) for row in ok]
    width = max(len(path) for path in paths)
    stream.write(f"{'image':<{width}}  {'answer':<14}  confidence  open score  top classes\n")
    for path, row in zip(paths, ok):
        stream.write(f"{path:<{width}}  {row['label_name']:<14}  {row['confidence']:10.3f}"
                     f"  {row['open_score']:10.4g}  {top(row).replace(';', ', ')}\n")
