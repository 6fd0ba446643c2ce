"""The Markdown tables of ``oltr bench`` (``OUT/results.md``): paper Tab. 3-style closed- and
open-set figures and Tab. 2-style detection figures per method, mean ± std over runs (the
summary :func:`oltr.bench.summarize` computes)."""
from __future__ import annotations

from typing import Any

CLOSED_COLUMNS = ("many", "medium", "few", "overall")
OPEN_COLUMNS = ("many", "medium", "few", "f_measure")
DETECTION_COLUMNS = ("detection_error", "auroc", "fpr95")


def _cell(stat: dict[str, Any], percent: bool = True) -> str:
    if stat["mean"] is None:
        return "n/a"
    factor = 100 if percent else 1
    digits = 1 if percent else 3
    if stat.get("n", 2) < 2:  # one run: no spread to show
        return f"{factor * stat['mean']:.{digits}f}"
    return f"{factor * stat['mean']:.{digits}f} ± {factor * stat['std']:.{digits}f}"


def format_results(results: dict[str, Any]) -> str:
    """The Markdown tables of a bench run."""
    summary = results["summary"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    data = results["data"] if isinstance(results["data"], str) else ", ".join(results["data"])
    lines = [
        f"# oltr bench: {results['benchmark']} ({data})",
        "",
        (f"Seeds {seeds}; mean ± std over runs (%). Epochs per method: "
        f"{results['epochs'] or 'as in each preset'}; machine: {results['machine']}; "
        f"wall time {results['wall_seconds'] / 60:.1f} min (reused runs cost nothing)."),
        "",
        "## Closed and open set (paper Tab. 3)",
        "",
        ("Open set: each run's decision rule (its open score and threshold, fitted on val; "
        "docs/decision.md)."),
        "",
        ("| method | closed many | closed medium | closed few | closed overall | open many | "
        "open medium | open few | open F-measure | train min |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in summary.items():
        cells = [_cell(entry["closed"][c]) for c in CLOSED_COLUMNS]
        cells += [_cell(entry["open"][c]) for c in OPEN_COLUMNS[:3]]
        cells.append(_cell(entry["open"]["f_measure"], percent=False))
        minutes = entry["train_minutes"]["mean"]
        cells.append("n/a" if minutes is None else f"{minutes:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    detectors = results["detectors"]
    for column, title in (("auroc", "AUROC (%) ↑"), ("fpr95", "FPR at 95 % TPR (%) ↓"),
                          ("detection_error", "detection error (%) ↓")):
        lines += ["", f"## Open-set detection, {title} (paper Tab. 2)", "",
                  "| method | " + " | ".join(detectors) + " |",
                  "|---|" + "---|" * len(detectors)]
        for method, entry in summary.items():
            lines.append(f"| {method} | " + " | ".join(
                _cell(entry["detectors"][d][column]) for d in detectors) + " |")
    lines += ["", ("Detectors that learn (OpenMax, kNN, reachability without a memory) are "
              "fitted on train-split outputs; each detector's threshold for the F-measure is "
              "calibrated on val. n/a: the detector does not apply to the method's model "
              "(e.g. ASH or SCALE on features that can be negative; the reason is in each "
              "run's report.json, detectors_inapplicable). The shared stage-1 training of "
              "two-stage methods counts in full for each of them in 'train min'."), ""]
    failures = results.get("failures") or []
    if failures:
        lines += ["## Failed runs", "",
                  (f"{len(failures)} run(s) failed and are left out of the means above (n/a "
                   "where a method has no run left); each error in full is in the bench's "
                   "output:"), ""]
        lines += [f"- {f['method']} on {f['data']}, seed {f['seed']}: {f['error']}"
                  for f in failures]
        lines.append("")
    return "\n".join(lines)
