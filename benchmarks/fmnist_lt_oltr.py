"""OLTR vs the plain model of equal epochs, and OLTR's ablations (paper Fig. 5), on Fashion-MNIST-LT.

    python benchmarks/fmnist_lt_oltr.py                 # 3 seeds, the full schedule
    python benchmarks/fmnist_lt_oltr.py --all           # + published s = 10, original centroid loss
    python benchmarks/fmnist_lt_oltr.py --quick         # a smoke run in a few minutes

Per seed: the plain model trained for as many epochs as OLTR's two stages together; OLTR stage 1
(the plain model, shared by every OLTR variant of that seed) and stage 2 for the full method and
for each ablation. Every run is evaluated closed- and open-set (threshold calibrated on val).
Finished runs are reused, so a killed benchmark continues where it stopped. Writes
``OUT/results.md`` (mean ± std over seeds) and ``OUT/results.json`` (every report).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from oltr.bench import machine_description
from oltr.config import load_config, stage_config
from oltr.data import curate
from oltr.train import train_run
from oltr.evaluate import evaluate_run
from oltr.io import read_json_object

# name → (method, overrides, evaluation overrides). Stage-2 variants reuse the full OLTR run's
# stage 1; a variant without training overrides only re-evaluates the full OLTR run.
VARIANTS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    "plain": ("plain", [], {}),
    "oltr": ("oltr", [], {}),
    "oltr, τ = 0 (no logit adjustment)": ("oltr", [], {"logit_adjustment": 0.0}),
    "oltr, published s = 10": ("oltr", ["stage2.model.reachability_scale=10.0"], {}),
    "oltr w/o memory feature": ("oltr", ["stage2.model.use_memory=false"], {}),
    "oltr w/o concept selector": ("oltr", ["stage2.model.use_selector=false"], {}),
    "oltr w/o reachability": ("oltr", ["stage2.model.use_reachability=false"], {}),
    "oltr w/o modulated attention": ("oltr", ["stage2.model.attention=false"], {}),
    "oltr, original centroid loss": ("oltr", ["stage2.train.centroid_loss=original",
                                              "stage2.train.centroid_margin=10.0",
                                              "stage2.train.centroid_weight=0.01"], {}),
}
# The set: plain, OLTR and its Fig. 5 ablations (+ τ = 0, a re-evaluation). The other
# variants answer "why" questions and run with --variants ... or --all.
EXTRA = ("oltr, published s = 10", "oltr, original centroid loss")
DEFAULT_VARIANTS = [name for name in VARIANTS if name not in EXTRA]
QUICK = ["model.width=8", "train.max_steps_per_epoch=5", "stage1.train.epochs=1",
         "stage2.train.epochs=1"]
COLUMNS = [("closed", "many"), ("closed", "medium"), ("closed", "few"), ("closed", "overall"),
           ("open", "many"), ("open", "medium"), ("open", "few"), ("open", "f_measure"),
           ("open", "auroc"), ("open", "fpr95")]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_variant(name: str, seed: int, data: Path, out: Path, extra: list[str],
                reevaluate: bool = False) -> dict[str, Any]:
    """Train (or reuse) one variant for one seed and return its evaluation report
    (``reevaluate``: evaluate a finished run again, keeping its recorded training time)."""
    method, overrides, evaluation = VARIANTS[name]
    eval_only = method == "oltr" and name != "oltr" and not overrides
    run_dir = out / f"{slug('oltr' if eval_only else name)}-seed{seed}"
    report_path = run_dir / f"report-{slug(name)}.json"
    if report_path.exists():
        report = read_json_object(report_path, "evaluation report")
        if not reevaluate:
            return report
        fresh = evaluate_run(run_dir, data, open_set=True, **evaluation)
        if "open_reachability" in report:
            fresh["open_reachability"] = evaluate_run(
                run_dir, data, open_set=True, open_score="reachability")["open"]
        fresh["train_seconds"] = report["train_seconds"]
        report_path.write_text(json.dumps(fresh, indent=2) + "\n")
        return fresh
    if method == "plain":  # as many epochs as OLTR's stages together
        oltr = load_config("oltr", overrides=[f"seed={seed}", *extra])
        total = sum(stage_config(oltr, s["name"])["train"]["epochs"] for s in oltr["stages"])
        shared = [o for o in extra if o.split(".")[0] not in ("stage1", "stage2")]
        config = load_config(method, overrides=[f"seed={seed}", *shared, *overrides,
                                                f"train.epochs={total}"])
    else:
        config = load_config(method, overrides=[f"seed={seed}", *extra, *overrides])
    if method == "oltr" and name != "oltr" and not eval_only:  # stage 2 only, from the full OLTR run's stage 1
        stage2 = next(s for s in config["stages"] if s["name"] == "stage2")
        stage2.setdefault("train", {})["init_from"] = str(out / f"oltr-seed{seed}" / "stage1")
        config["stages"] = [stage2]
    train_seconds = 0.0
    if not eval_only:
        started = time.perf_counter()
        train_run(config, data, run_dir, resume=run_dir.exists(), progress=False)
        train_seconds = time.perf_counter() - started
    report = evaluate_run(run_dir, data, open_set=True, **evaluation)
    if name == "oltr":
        reach = evaluate_run(run_dir, data, open_set=True, open_score="reachability")
        report["open_reachability"] = reach["open"]
    report["train_seconds"] = train_seconds
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarise(reports: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Mean ± std (percent) of each column per variant, as Markdown and as a dict."""
    header = ("| method | " + " | ".join(f"{s} {k}" for s, k in COLUMNS)
              + " | τ | train min |")
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 3)]
    summary: dict[str, Any] = {}
    for name, runs in reports.items():
        cells, summary[name] = [], {}
        for section, key in COLUMNS:
            values = np.array([r[section][key] for r in runs], dtype=float) * 100
            summary[name][f"{section}.{key}"] = (float(values.mean()), float(values.std()))
            cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
        taus = sorted({r.get("logit_adjustment", 0.0) for r in runs})
        cells.append(", ".join(f"{t:g}" for t in taus))
        minutes = np.mean([r["train_seconds"] for r in runs]) / 60
        cells.append(f"{minutes:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/fmnist-lt"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-oltr"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help="default: plain, OLTR, τ = 0 and the four ablations")
    parser.add_argument("--all", action="store_true",
                        help="every variant, also: " + "; ".join(EXTRA))
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate finished runs again (after a change of the evaluation), "
                             "keeping their recorded training times")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.all:
        args.variants = list(VARIANTS)
    extra = [*(QUICK if args.quick else []), *args.overrides]
    if args.quick and args.out == parser.get_default("out"):
        args.out = Path("runs/bench-oltr-quick")
    if not (args.data / "manifest.json").exists():
        protocol = load_protocol()
        curate("fashion-mnist", args.data, **protocol)
    started = time.perf_counter()
    reports: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    order = ["oltr", *[v for v in args.variants if v != "oltr"]]  # stage 1 first
    for seed in args.seeds:
        for name in order:
            if name in args.variants or (name == "oltr" and len(args.variants) > 1):
                report = run_variant(name, seed, args.data, args.out, extra,
                                     args.reevaluate)
                if name in reports:
                    reports[name].append(report)
                print(f"seed {seed} {name}: closed {report['closed']['overall']:.3f} "
                      f"few {report['closed']['few']:.3f} many {report['closed']['many']:.3f} "
                      f"F {report['open']['f_measure']:.3f} AUROC {report['open']['auroc']:.3f}",
                      flush=True)
    table, summary = summarise(reports)
    reach = [r["open_reachability"] for r in reports.get("oltr", [])]
    if reach:
        table += ("\n\nOLTR with the reachability γ (Eq. 3) as the open score: AUROC "
                  f"{100 * np.mean([r['auroc'] for r in reach]):.1f} ± "
                  f"{100 * np.std([r['auroc'] for r in reach]):.1f}, F-measure "
                  f"{np.mean([r['f_measure'] for r in reach]):.3f} ± "
                  f"{np.std([r['f_measure'] for r in reach]):.3f}")
    minutes = (time.perf_counter() - started) / 60
    machine = machine_description()
    text = (f"Fashion-MNIST-LT, seeds {args.seeds}, open score msp (threshold calibrated on val), "
            f"percent, mean ± std over seeds.\n\n{table}\n\nwall time {minutes:.1f} min "
            f"({'re-evaluation only' if args.reevaluate else 'reused runs count 0'}) on "
            f"{machine}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"seeds": args.seeds, "overrides": extra, "summary": summary, "reports": reports},
        indent=2) + "\n")
    print(text)


def load_protocol() -> dict[str, Any]:
    from oltr.cli import protocol_defaults

    return protocol_defaults("fmnist_lt")


if __name__ == "__main__":
    main()
