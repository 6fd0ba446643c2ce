"""``oltr identify``: face identification with a trained run by pseudo-shot group (MegaFace,
paper Tab. 4; :func:`oltr.evaluation.identify_run.identify_run`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from oltr.cli.common import DefaultsHelpFormatter, default_of
from oltr.evaluation.identification import GALLERY_MODES, TIE_RULES
from oltr.evaluation.identify_run import identify_run
from oltr.evaluation.terminal import format_identification

NAME = "identify"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr identify`` to the ``oltr`` command's sub-parsers."""
    p = subparsers.add_parser(
        NAME, help="face identification by pseudo-shot group (MegaFace, paper Tab. 4)",
        description="Embed probes, gallery, distractors and the training images with RUN's "
                    "network (its direct features v_direct) and report rank-1 identification "
                    "overall, per pseudo-shot group (training images with cosine similarity > "
                    "--threshold: many >= 6, few 2-5, one = 1, zero = 0) and per attribute "
                    "value (docs/identification.md).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="trained run directory (or a stage directory)")
    p.add_argument("--probes", required=True, metavar="SPLIT",
                   help="split file of probe images: 'path identity' per line")
    p.add_argument("--gallery", metavar="SPLIT",
                   help="split file of gallery images ('path identity'); default: the probes "
                        "are their own gallery, each left out of its own search")
    p.add_argument("--distractors", metavar="DIR|SPLIT",
                   help="distractor images: a folder (searched recursively) or a split file")
    p.add_argument("--image-root", dest="image_root", metavar="DIR",
                   help="where the probe and gallery paths are relative to (default: the "
                        "split file's folder)")
    p.add_argument("--data", metavar="DIR",
                   help="benchmark whose train split gives the pseudo-shots (default: the one "
                        "the run was trained on, run.json)")
    p.add_argument("--reference-embeddings", dest="reference_embeddings", nargs=2,
                   metavar=("PROBES", "TRAIN"),
                   help="pseudo-shots from a reference model's embeddings (.npy or "
                        ".safetensors, rows in the order of --probes and of the training "
                        "split), as the paper's ArcFace features, instead of the run's own")
    p.add_argument("--no-pseudo-shots", dest="no_pseudo_shots", action="store_true",
                   help="no pseudo-shot groups (no training images needed)")
    p.add_argument("--attributes", metavar="FILE",
                   help="'identity<TAB>NAME' header, then 'identity<TAB>value' rows (e.g. "
                        "gender, Tab. 4's male / female)")
    _add_protocol_options(p)
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help="images per forward pass (default: the run's eval.batch_size)")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", metavar="DIR",
                   help="keep the embeddings (.npy) there (default: a temporary folder)")
    p.add_argument("--device", default=default_of(identify_run, "device"))
    p.add_argument("--output", help="report path (default RUN/identification.json)")
    p.set_defaults(func=run)
    return p


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    """The protocol's settings, defaulting to :func:`identify_run`'s."""
    p.add_argument("--gallery-mode", dest="gallery_mode", choices=GALLERY_MODES,
                   default=default_of(identify_run, "gallery_mode"),
                   help="all: one gallery of every image; megaface: one mate per trial against "
                        "the distractors (MegaFace challenge 1)")
    p.add_argument("--ties", choices=TIE_RULES, default=default_of(identify_run, "ties"),
                   help="a mate tied with a non-mate: a miss, or a hit (MegaFace devkit)")
    p.add_argument("--threshold", type=float, default=default_of(identify_run, "threshold"),
                   help="pseudo-shot cosine-similarity threshold (paper: 0.7)")


def run(args: argparse.Namespace) -> int:
    """Identify; print Tab. 4's row and write the report (``--output`` or
    ``RUN/identification.json``)."""
    output = args.output or Path(args.run) / "identification.json"
    report = identify_run(
        args.run, args.probes, gallery=args.gallery, distractors=args.distractors,
        image_root=args.image_root, data=args.data,
        reference_embeddings=tuple(args.reference_embeddings) if args.reference_embeddings
        else None,
        pseudo_shots=not args.no_pseudo_shots, attributes=args.attributes,
        gallery_mode=args.gallery_mode, ties=args.ties, threshold=args.threshold,
        device=args.device, batch_size=args.batch_size, embeddings_dir=args.embeddings_dir,
        output=output)
    print(format_identification(report))
    print(f"report written to {output}")
    return 0


def interrupted_hint(args: argparse.Namespace) -> str:
    """Reports are written whole or not at all."""
    return "no report was written; run the command again"
