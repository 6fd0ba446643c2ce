"""``oltr report``: a run's evaluation as an HTML page with its figures
(:func:`oltr.evaluation.page.build_report`)."""
from __future__ import annotations

import argparse
from typing import Any

from oltr.cli.common import DefaultsHelpFormatter, default_of
from oltr.evaluation import page
from oltr.evaluation.html import PAGE_FILE

NAME = "report"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr report`` to the ``oltr`` command's sub-parsers; its description is the second
    paragraph of :mod:`oltr.evaluation.page`'s docstring."""
    assert page.__doc__ is not None
    parser = subparsers.add_parser(
        NAME, help="write an HTML page with the figures of a run's evaluation",
        description=page.__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("run", help="run directory written by `oltr train`")
    parser.add_argument("--data", required=True, help="the curated benchmark directory")
    parser.add_argument("--out", required=True,
                        help=f"output directory ({PAGE_FILE} + PNG figures); oltr writes only "
                             "into a directory it created")
    parser.add_argument("--device", default=default_of(page.build_report, "device"))
    parser.add_argument("--image-root", dest="image_root",
                        help="where the images are now, when they moved since training "
                             "(default: the run's data.image_root)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Render the page; print where it went."""
    path = page.build_report(args.run, args.data, args.out, device=args.device,
                             image_root=args.image_root)
    print(f"report written to {path}")
    return 0
