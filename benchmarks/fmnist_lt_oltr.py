"""OLTR against the plain model of equal epochs, OLTR's ablations (paper Fig. 5) and its open-set
answers, on Fashion-MNIST-LT — on the development or the reporting protocol.

    python benchmarks/fmnist_lt_oltr.py                          # reporting: curations 1, 2, 3
    python benchmarks/fmnist_lt_oltr.py --protocol development   # design choices: val figures
    python benchmarks/fmnist_lt_oltr.py --quick                  # a smoke run (minutes)

Protocols (benchmarks/README.md): *development* — the curation seed 0 (data/fmnist-lt), training
seed 0 (``--seeds 0 1 2``: training seeds on that one curation); every design choice is made on
its val and val_open splits, and this mode prints val figures only. *reporting* — fresh
curations with seeds 1, 2, 3 (other known, open and validation-open classes, other class orders;
data/fmnist-lt-s1 …), training seed = curation seed, test figures as mean ± std over the three,
once the choices are frozen.

Every variant is a method of `oltr bench` (oltr.bench.run_bench): stages are cached, so every
OLTR variant shares its stage 1 and a killed benchmark continues where it stopped. Each run's
decision rule is fitted on val when it is trained (docs/decision.md). Writes OUT/results.md and
OUT/results.json, and OUT/bench/ (the runs).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from oltr.bench import machine_description, run_bench
from oltr.cli.curate import protocol_defaults
from oltr.config import load_config, stage_config
from oltr.data import curate
from oltr.evaluation.closed_open import evaluate_run
from oltr.io import read_json_object

OLTR_EPOCHS = sum(stage_config(load_config("oltr"), s["name"])["train"]["epochs"]
                  for s in load_config("oltr")["stages"])
# name → (preset, overrides): each a method of oltr bench
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain": ("plain", [f"train.epochs={OLTR_EPOCHS}"]),
    "oltr": ("oltr", []),
    "oltr w/o memory feature": ("oltr", ["stage2.model.use_memory=false"]),
    "oltr w/o concept selector": ("oltr", ["stage2.model.use_selector=false"]),
    "oltr w/o reachability": ("oltr", ["stage2.model.use_reachability=false"]),
    "oltr w/o modulated attention": ("oltr", ["stage2.model.attention=false"]),
    "oltr w/o centroid loss": ("oltr", ["stage2.train.centroid_loss=none"]),
    "oltr, printed Eq. 9 (sum over all centroids)": ("oltr", [
        "stage2.train.centroid_loss=printed", "stage2.train.centroid_margin=5.0",
        "stage2.train.centroid_relative_margin=false"]),
    "oltr, original centroid loss": ("oltr", [
        "stage2.train.centroid_loss=original", "stage2.train.centroid_margin=10.0",
        "stage2.train.centroid_weight=0.01", "stage2.train.centroid_relative_margin=false"]),
    "oltr, published s = 10": ("oltr", ["stage2.model.reachability_scale=10.0"]),
    # the stage split of the 30 epochs (the preset's 22 + 8), decided on the development val
    "oltr, stages 26 + 4": ("oltr", ["stage1.train.epochs=26", "stage2.train.epochs=4"]),
    "oltr, stages 18 + 12": ("oltr", ["stage1.train.epochs=18", "stage2.train.epochs=12"]),
    "oltr, stages 14 + 16": ("oltr", ["stage1.train.epochs=14", "stage2.train.epochs=16"]),
    # stage 2 re-balanced by the loss instead of the sampler (balanced softmax, Ren et al. 2020,
    # with instance sampling: with class-aware batches as well it would compensate twice)
    "oltr, balanced softmax stage 2": ("oltr", ["stage2.train.loss=balanced_softmax",
                                                "stage2.train.sampler=instance"]),
}
EXTRA = ("oltr, published s = 10", "oltr, original centroid loss",
         "oltr, printed Eq. 9 (sum over all centroids)", "oltr, stages 26 + 4",
         "oltr, stages 18 + 12", "oltr, stages 14 + 16", "oltr, balanced softmax stage 2")
DEFAULT_VARIANTS = [name for name in VARIANTS if name not in EXTRA]
# OLTR's own open-set answers, each an evaluation of the full OLTR runs (name → eval overrides)
OPEN_ANSWERS: dict[str, dict[str, Any]] = {
    "decision rule (auto: chosen on val_open)": {},
    "reachability γ (Eq. 3, published)": {"open_score": "reachability"},
    "reachability on unit vectors": {"open_score": "reachability",
                                     "open_score_options": {"normalize": True}},
    "reachability, 4 prototypes per class": {"open_score": "reachability",
                                             "open_score_options": {"prototypes": 4}},
    "k-th nearest train feature (k = 10)": {"open_score": "knn",
                                            "open_score_options": {"k": 10, "normalize": False}},
    "msp": {"open_score": "msp"},
}
QUICK = ["model.width=8", "train.max_steps_per_epoch=3"]
QUICK_EPOCHS = {"plain": ["train.epochs=2"], "oltr": ["stage1.train.epochs=1",
                                                      "stage2.train.epochs=1"]}
COLUMNS = [("closed", "many"), ("closed", "medium"), ("closed", "few"), ("closed", "overall"),
           ("open", "many"), ("open", "medium"), ("open", "few"), ("open", "f_measure"),
           ("open", "auroc"), ("open", "fpr95")]


def curations(protocol: str, seeds: list[int], data_root: Path) -> list[Path]:
    """The benchmarks of a protocol (curated here when missing): *development* — the one
    development curation (seed 0) whatever the training ``seeds`` (the reporting curations are
    never looked at for a choice); *reporting* — curation ``seed`` for each seed."""
    settings = protocol_defaults("fmnist_lt")
    dirs = []
    for seed in [0] if protocol == "development" else seeds:
        path = data_root / ("fmnist-lt" if protocol == "development" else f"fmnist-lt-s{seed}")
        if not (path / "manifest.json").exists():
            curate("fashion-mnist", path, **(settings | {"seed": seed}))
        dirs.append(path)
    return dirs


def val_figures(run_dir: Path) -> dict[str, float | None]:
    """What the development protocol decides on: the balanced val accuracy after the rule's
    logit adjustment, its val many/medium/few (at the selected epoch), the val_open AUROC of
    the rule's open score."""
    rule = read_json_object(run_dir / "decision.json", "decision rule")
    record = rule["record"]
    stage = read_json_object(run_dir / "run.json", "run")["final_stage"]
    info = read_json_object(run_dir / stage / "model.json", "model")
    history = [json.loads(line) for line in (run_dir / stage / "history.jsonl").read_text()
               .splitlines()]
    best = next(h for h in history if h["epoch"] == info["epoch"])
    la = record.get("logit_adjustment", {})
    grid, objective = la.get("grid"), la.get("objective")
    balanced = (objective[grid.index(rule["logit_adjustment"])] if grid and objective
                else info["val_accuracy"])
    choice = record.get("open_score", {})
    auroc = None
    if "candidates" in choice:
        auroc = dict(zip(choice["candidates"], choice["objective"]))[rule["open_score"]]
    return {"val balanced": balanced, "val many": best["val_many"],
            "val medium": best["val_medium"], "val few": best["val_few"],
            "val_open AUROC": auroc, "τ": rule["logit_adjustment"],
            "open score": rule["open_score"]}


def val_open_figures(run_dir: Path, data: Path, overrides: dict[str, Any]) -> dict[str, float]:
    """An open score's figures on val (known) against val_open, its threshold fitted on val."""
    from oltr.evaluation.open_set import open_set_figures
    from oltr.evaluation.run_outputs import collect_run_outputs

    outputs = collect_run_outputs(run_dir, data, ("val", "val_open"), overrides=overrides)
    val, val_open = outputs.splits["val"], outputs.splits["val_open"]
    assert outputs.rule is not None and outputs.rule.threshold is not None
    return open_set_figures(val, val_open, val["open_score"], val_open["open_score"],
                            outputs.rule.threshold, outputs.train_counts, outputs.group_kw)


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    array = np.array(values, dtype=float) * scale
    return f"{array.mean():.{digits}f} ± {array.std():.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["development", "reporting"], default="reporting")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="reporting: curation (= training) seeds, default 1 2 3; "
                             "development: training seeds on the development curation, "
                             "default 0")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=list(VARIANTS))
    parser.add_argument("--all", action="store_true", help="also: " + "; ".join(EXTRA))
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every variant")
    args = parser.parse_args()
    development = args.protocol == "development"
    seeds = args.seeds or ([0] if development else [1, 2, 3])
    variants = list(VARIANTS) if args.all else args.variants
    out = args.out or Path(f"runs/bench-oltr-{args.protocol}{'-quick' if args.quick else ''}")
    data = curations(args.protocol, seeds, args.data_root)
    methods = []
    for name in variants:
        preset, own = VARIANTS[name]
        if args.quick:  # a smoke run: a step or two per stage (the plain model as many epochs)
            own = [o for o in own if not o.startswith("train.epochs=")] + QUICK_EPOCHS[preset]
        methods.append((name, preset, own))
    started = time.perf_counter()
    results = run_bench(data if len(data) > 1 else data[0], out / "bench", methods=methods,
                        detectors=["msp", "energy", "knn", "reachability"], seeds=seeds,
                        overrides=[*(QUICK if args.quick else []), *args.overrides],
                        quick=False)
    runs = {name: [out / "bench" / "runs" / p for p in _run_names(results, name, data, seeds)]
            for name in variants}
    seeds_said = ("training seeds" if development else "curation/training seeds")
    lines = [(f"Fashion-MNIST-LT, {args.protocol} protocol, {seeds_said} {seeds}; "
             f"machine: {machine_description()}."), ""]
    summary: dict[str, Any] = {}
    if development:  # val figures only: this is where choices are made
        keys = ["val balanced", "val many", "val medium", "val few", "val_open AUROC"]
        lines += ["| variant | " + " | ".join(keys) + " | τ | open score |",
                  "|---|" + "---|" * (len(keys) + 2)]
        for name in variants:
            figures = [val_figures(run) for run in runs[name]]
            summary[name] = figures
            cells = [_cell([f[k] for f in figures]) if all(f[k] is not None for f in figures)
                     else "n/a" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " | "
                         + ", ".join(f"{f['τ']:g}" for f in figures) + " | "
                         + ", ".join(f["open score"] for f in figures) + " |")
    else:
        lines += ["| variant | " + " | ".join(f"{s} {k}" for s, k in COLUMNS)
                  + " | τ | open score | train min |", "|---|" + "---|" * (len(COLUMNS) + 3)]
        for name in variants:
            reports = results["reports"][name]
            summary[name] = reports
            cells = [_cell([r[s][k] for r in reports], 1.0 if k == "f_measure" else 100.0,
                           3 if k == "f_measure" else 1) for s, k in COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " | "
                         + ", ".join(f"{r['logit_adjustment']:g}" for r in reports) + " | "
                         + ", ".join(r["open"]["open_score"] for r in reports) + " | "
                         + f"{np.mean([r['train_seconds'] for r in reports]) / 60:.1f} |")
    if "oltr" in variants:  # OLTR's open-set answers, each with its threshold fitted on val
        lines += ["", "OLTR's open-set answers (the full OLTR runs; each open score with its "
                  "threshold fitted on val" + ("; val_open AUROC" if development else "; test")
                  + "):", ""]
        answers = {}
        for answer, overrides in OPEN_ANSWERS.items():
            if development:  # val (known) against val_open, never the test splits
                answers[answer] = [val_open_figures(run, d, overrides)
                                   for run, d in zip(runs["oltr"], data)]
            else:
                answers[answer] = [evaluate_run(run, d, open_set=True, **overrides)["open"]
                                   for run, d in zip(runs["oltr"], data)]
        summary["open answers"] = answers
        lines += ["| open score | AUROC | FPR@95 | F-measure | open overall |",
                  "|---|---|---|---|---|"]
        for answer, figures in answers.items():
            lines.append(f"| {answer} | {_cell([f['auroc'] for f in figures])} | "
                         f"{_cell([f['fpr95'] for f in figures])} | "
                         f"{_cell([f['f_measure'] for f in figures], 1.0, 3)} | "
                         f"{_cell([f['overall'] for f in figures])} |")
    minutes = (time.perf_counter() - started) / 60
    lines += ["", f"wall time {minutes:.1f} min (finished runs are reused: they cost nothing)."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"protocol": args.protocol, "seeds": seeds, "data": [str(d) for d in data],
         "summary": summary}, indent=2, default=str) + "\n")
    print(text)


def _run_names(results: dict[str, Any], name: str, data: list[Path], seeds: list[int]
               ) -> list[str]:
    from oltr.bench import _run_name

    return [_run_name(name, d, s, len(data) > 1) for d, s in (
        zip(data, seeds) if len(data) > 1 else [(data[0], s) for s in seeds])]


if __name__ == "__main__":
    main()
