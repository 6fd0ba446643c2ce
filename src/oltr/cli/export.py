"""``oltr export``: a trained run (network + decision rule) as one ONNX model
(:func:`oltr.export.export_onnx`; ``--opset`` defaults to its
:data:`~oltr.export.DEFAULT_OPSET`)."""
from __future__ import annotations

import argparse
from typing import Any

from oltr import export
from oltr.cli.common import DefaultsHelpFormatter
from oltr.decision import DecisionRule
from oltr.run import RunDir

NAME = "export"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr export`` to the ``oltr`` command's sub-parsers."""
    p = subparsers.add_parser(
        NAME, help="export a trained run (network + decision rule) to ONNX",
        description="Write the full inference path of RUN's final stage — network, "
                    "τ-normalisation, logit adjustment, open score and threshold of its "
                    "decision rule (decision.json; a closed-set msp rule without one) — as one "
                    "ONNX model. Input: preprocessed float32 images (B, C, H, W); outputs: "
                    "logits, open_score, prediction (-1 = unknown), confidence. Class names, "
                    "threshold and data settings (for preprocessing) are in its metadata.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="trained run directory (or a stage directory)")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="fixed batch size (default: a dynamic batch dimension)")
    p.add_argument("--opset", type=int, default=export.DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset (>= {export.MIN_OPSET})")
    p.add_argument("--force", action="store_true",
                   help="replace FILE if it is an ONNX model oltr exported (never another file)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``oltr export RUN --onnx FILE``: the run's final stage and its decision rule."""
    run_dir = RunDir(args.run)
    stage_dir = run_dir.final_stage().path
    rule = None
    if run_dir.has_decision():
        rule = DecisionRule.load(run_dir.path)
    else:
        print(f"note: {run_dir.decision_path} not found: exporting a closed-set rule (the "
              "model's logits, msp open score, no threshold: never 'unknown')")
    result = export.export_onnx(stage_dir, rule, args.onnx, opset=args.opset, batch=args.batch,
                                force=args.force)
    threshold = "none" if result.threshold is None else f"{result.threshold:.6g}"
    batch = "dynamic" if result.batch is None else str(result.batch)
    check = ("not checked (onnxruntime not installed)" if not result.differences else
             "onnxruntime matches PyTorch (max |diff| "
             + ", ".join(f"{k} {v:.2g}" for k, v in result.differences.items()) + ")")
    print(f"wrote {result.path} (opset {result.opset}, batch {batch}, open score "
          f"{result.open_score}, threshold {threshold}); {check}")
    return 0
