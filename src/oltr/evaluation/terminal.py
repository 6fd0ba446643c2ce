"""What the evaluation commands print on the terminal: the evaluation report's headline table
(``oltr evaluate``, ``oltr train --evaluate``) and the identification result's Tab. 4 row
(``oltr identify``)."""
from __future__ import annotations

from typing import Any

from oltr import metrics


def _pct(value: float | None) -> str:
    return f"{metrics.percent_text(value) or 'n/a':>5}"


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
    detectors = {name: figures for name, figures in (report.get("detectors") or {}).items()
                 if "auroc" in figures}
    if detectors:
        lines.append("detectors (each threshold fitted on val):  F-meas  AUROC  FPR95")
        lines += [f"  {name:<38} {figures['f_measure']:.3f}  {_pct(figures['auroc'])}  "
                  f"{_pct(figures['fpr95'])}" for name, figures in detectors.items()]
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


def _rank1_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_identification(report: dict[str, Any]) -> str:
    """Tab. 4's row for one model: rank-1 (%) overall, per pseudo-shot group and attribute."""
    lines = [(f"{report.get('method')} (stage {report.get('stage')}): rank-1 identification "
              f"{_rank1_pct(report['rank1'])} % over {report['trials']} trials "
              f"({report['probes']} probes, gallery {report['gallery']}"
              f"{' leave-one-out' if report['leave_one_out'] else ''}, "
              f"{report['distractors']} distractors, mode {report['gallery_mode']})")]
    if report.get("groups"):
        names = list(report["groups"])
        lines.append("pseudo-shots " + "  ".join(f"{name:>10}" for name in names))
        lines.append("rank-1 %     " + "  ".join(
            f"{_rank1_pct(report['groups'][name]['rank1']):>10}" for name in names))
        lines.append("probes       " + "  ".join(
            f"{report['groups'][name]['probes']:>10}" for name in names))
    if report.get("attributes"):
        lines.append(f"{report['attribute']}: " + ", ".join(
            f"{value} {_rank1_pct(figures['rank1'])} % ({figures['probes']} probes)"
            for value, figures in report["attributes"].items()))
    return "\n".join(lines)
