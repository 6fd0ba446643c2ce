"""``oltr bench``: methods × open-set detectors × seeds on one or several benchmarks, as tables.

With several benchmarks (``--data`` repeated: the reporting protocol's fresh curations, one per
curation seed) each run pairs benchmark *i* with training seed *i*, and the tables give the
mean ± std over those runs. A method is a preset name, or — from Python — a variant
``(name, preset, overrides)`` (an ablation: ``("oltr w/o memory", "oltr",
["stage2.model.use_memory=false"])``), which shares every stage it has in common with the
others through the cache.

Every method is a preset over the one engine (``configs/<benchmark>/<method>.yaml``). Stages are
trained into a content-addressed cache, ``OUT/stages/<stage>-<hash>``, the hash covering the
stage's resolved config and the stage it starts from: identical stages (e.g. the plain stage 1
that cRT, LWS, FSLwF and OLTR share) train once, a finished stage is reused by later
invocations, and a killed one resumes from its last checkpoint. Each method/seed gets a run
folder ``OUT/runs/<method>-seed<k>`` whose stage folders link into the cache, so ``oltr
evaluate`` and ``oltr predict`` take it as any run. Every run is evaluated once with all the
detectors (one forward pass per split; detectors work on stored outputs) and the report kept.

``OUT`` and every folder in it carry oltr's marker (:mod:`oltr.ownership`): a bench continues
only in a directory oltr wrote, and is locked while it runs (a second bench into the same
``OUT`` stops, naming the PID of the first). A kept report is reused only when it was computed
from the weights the run holds now.

Writes ``OUT/results.md`` (paper Tab. 3-style closed/open table and Tab. 2-style detection
table, mean ± std over seeds) and ``OUT/results.json`` (every figure of every run).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oltr.config import (
    COMPARISON_DETECTORS as DEFAULT_DETECTORS,
)
from oltr.config import (
    COMPARISON_METHODS as DEFAULT_METHODS,
)
from oltr.config import (
    DEFAULT_BENCHMARK,
    absolute_paths,
    load_config,
    stage_config,
)
from oltr.data.splits import sha256_file
from oltr.detectors import list_detectors
from oltr.errors import InputError, OltrError, one_line
from oltr.evaluation.closed_open import evaluate_run
from oltr.evaluation.markdown import (
    CLOSED_COLUMNS,
    DETECTION_COLUMNS,
    OPEN_COLUMNS,
    format_results,
)
from oltr.io import atomic_write_text, read_json_object
from oltr.ownership import claim_directory, locked
from oltr.run import RunDir, StageDir
from oltr.train import build_stage, fit

QUICK_OVERRIDES = ("model.width=8", "train.max_steps_per_epoch=3")
#: Total epochs of every method in a ``--quick`` smoke bench (``oltr bench --quick`` without
#: ``--epochs``).
QUICK_EPOCHS = 2
DONE = "stage-done.json"


def scale_epochs(config: dict[str, Any], total: int) -> dict[str, Any]:
    """``config`` (changed in place and returned) with its stages' epochs rescaled to exactly
    ``total`` in all, each stage keeping its share (largest-remainder rounding, at least 1
    epoch each) and a deferred re-weighting start (``train.drw_epoch``) moved with its stage
    (``round(drw · new / old)``, within 1 … new)."""
    if total < len(config["stages"]):
        raise InputError(f"--epochs must be at least the number of stages "
                         f"({len(config['stages'])})", value=total)
    epochs = [stage_config(config, s["name"])["train"]["epochs"] for s in config["stages"]]
    shares = [e * total / sum(epochs) for e in epochs]
    scaled = [max(1, math.floor(share)) for share in shares]
    while sum(scaled) < total:  # give the epochs left to the largest remainders
        i = max(range(len(scaled)), key=lambda k: shares[k] - scaled[k])
        scaled[i] += 1
    while sum(scaled) > total:  # the minimum of 1 overshot: take from the most overfull
        i = max((k for k in range(len(scaled)) if scaled[k] > 1),
                key=lambda k: scaled[k] - shares[k])
        scaled[i] -= 1
    for stage, old, new in zip(config["stages"], epochs, scaled):
        train = stage.setdefault("train", {})
        drw = stage_config(config, stage["name"])["train"]["drw_epoch"]
        train["epochs"] = new
        if drw is not None:
            train["drw_epoch"] = min(new, max(1, round(drw * new / old)))
    return config


#: Keys added after the stage cache existed, with their defaults: left out of a stage's key
#: while they hold them, so the stages cached before the keys existed are still found.
LATER_KEYS = {("data", "decode"): "cpu", ("train", "feature_cache"): "off",
              ("train", "feature_cache_dtype"): "float32", ("train", "compile"): False}


def stage_key(cfg: dict[str, Any], previous_key: str | None, data: str | None = None) -> str:
    """Hash of what a stage's training depends on: its resolved config less the method's name
    and the evaluation settings (plain, τ-norm and post-hoc logit adjustment share one
    training), less the :data:`LATER_KEYS` at their defaults, the key of the stage it starts
    from, and the benchmark (``data``: the digest of its manifest, :func:`data_key`)."""
    body = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()
            if k not in ("method", "eval")}
    for (section, key), default in LATER_KEYS.items():
        if section in body and body[section].get(key, default) == default:
            body[section].pop(key, None)
    text = json.dumps({"config": body, "from": previous_key, **({"data": data} if data else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_key(data_dir: Path) -> str:
    """A benchmark's identity for the stage cache: the sha256 of its manifest (which holds the
    sha256 of every split file), or of its split files when it has none."""
    manifest = data_dir / "manifest.json"
    files = [manifest] if manifest.is_file() else sorted(data_dir.glob("*.txt"))
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()[:16]


def train_cached(
    config: dict[str, Any], data_dir: Path, out: Path, run_dir: Path, *, progress: bool = False,
    data_digest: bool = False,
) -> dict[str, float]:
    """Train (or reuse) every stage of ``config`` in the cache under ``out/stages`` and link
    them into ``run_dir``; returns the training seconds per stage (0 for a reused one)."""
    claim_directory(run_dir, "run", what="bench run directory", reuse=True, protect=(data_dir,))
    previous: Path | None = None
    previous_key: str | None = None
    data = data_key(data_dir) if data_digest else None
    seconds: dict[str, float] = {}
    names = [stage["name"] for stage in config["stages"]]
    for name in names:
        cfg = stage_config(config, name)
        init = cfg["train"]["init_from"]
        if init not in ("previous", None, "none"):
            raise InputError("oltr bench trains each method's stages in order: "
                             "train.init_from must be previous or none", value=init)
        start = previous if init == "previous" else None
        key = stage_key(cfg, previous_key if start is not None else None, data)
        stage_dir = out / "stages" / f"{name}-{key}"
        done = stage_dir / DONE
        cfg = _config_of_started_stage(stage_dir, cfg)
        if done.exists():
            seconds[name] = 0.0
        else:
            result = fit(build_stage(cfg, data_dir, stage_dir, init_from=start, resume=True,
                                     progress=progress), progress=progress)
            atomic_write_text(done, json.dumps({"seconds": result.seconds,
                                                "best_epoch": result.best_epoch}) + "\n")
            seconds[name] = result.seconds
        link = run_dir / name
        target = os.path.relpath(stage_dir, run_dir)
        if link.is_symlink() and os.readlink(link) != target:
            link.unlink()
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
        previous, previous_key = stage_dir, key
    run = RunDir(run_dir)
    run.save_config(config)
    run.write_info(config["method"], names, data_dir)
    return seconds


def _config_of_started_stage(stage_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The config a cached stage was started with, when another method started it: it differs
    from ``cfg`` at most in what the cache key leaves out (method name, eval settings), and
    resuming needs the very config of the checkpoint."""
    stage = StageDir(stage_dir)
    if not stage.config_path.exists():
        return cfg
    started = stage.config()
    if {k: v for k, v in started.items() if k not in ("method", "eval")} != {
            k: v for k, v in cfg.items() if k not in ("method", "eval")}:
        raise InputError("a cached stage folder holds another config (hash collision, or "
                         "edited by hand); remove it", path=stage_dir)
    return started


def _stage_seconds(run_dir: Path, names: Sequence[str]) -> float:
    """Training seconds of a run's stages as recorded in the cache (shared stages count fully)."""
    total = 0.0
    for name in names:
        done = run_dir / name / DONE
        if done.exists():
            total += float(read_json_object(done, "stage record").get("seconds", 0.0))
    return total


Method = str | tuple[str, str, Sequence[str]]


def _method(entry: Method) -> tuple[str, str, list[str]]:
    """``(name, preset, overrides)`` of a method entry (a preset name is its own name)."""
    if isinstance(entry, str):
        return entry, entry, []
    name, preset, overrides = entry
    return name, preset, list(overrides)


def run_bench(
    data_dir: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    methods: Sequence[Method] = DEFAULT_METHODS,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    benchmark: str = DEFAULT_BENCHMARK,
    open_sets: dict[str, str] | None = None,
    detector_options: dict[str, dict[str, Any]] | None = None,
    quick: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) and evaluate every method × run; write and return the results. The
    runs are the training ``seeds`` on one benchmark, or — ``data_dir`` a list of several —
    benchmark *i* with seed *i* (``seeds`` one per benchmark)."""
    data_dirs = [Path(d) for d in ([data_dir] if isinstance(data_dir, (str, Path))
                                   else data_dir)]
    out = Path(out)
    unknown = [d for d in detectors if d not in list_detectors()]
    if unknown:
        raise InputError(f"unknown detector (valid: {', '.join(list_detectors())})",
                         value=unknown[0])
    if not methods or not seeds or not data_dirs:
        raise InputError("oltr bench needs at least one method, one seed and one benchmark")
    if len(data_dirs) > 1 and len(seeds) != len(data_dirs):
        raise InputError(f"with {len(data_dirs)} benchmarks, give one training seed per "
                         f"benchmark (--seeds), not {len(seeds)}", value=list(seeds))
    pairs = ([(data_dirs[0], seed) for seed in seeds] if len(data_dirs) == 1
             else list(zip(data_dirs, seeds)))
    entries = [_method(entry) for entry in methods]
    names = [name for name, _, _ in entries]
    if len(set(names)) != len(names):
        raise InputError("method names must be unique", value=names)
    extra = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    configs = {}
    for name, preset, own in entries:  # resolve every preset first: a typo fails before hours
        for data, seed in pairs:       # of training
            config = load_config(preset, benchmark=benchmark,
                                 overrides=[f"seed={seed}", *extra, *own])
            config = absolute_paths(config | {"method": name})  # as train_run saves it
            configs[name, data, seed] = scale_epochs(config, epochs) if epochs else config
    claim_directory(out, "bench", what="bench directory", reuse=True, protect=data_dirs)
    with locked(out, "bench directory"):
        return _run_matrix(configs, pairs, out, methods=names, detectors=detectors,
                           epochs=epochs, extra=extra, benchmark=benchmark,
                           open_sets=open_sets, detector_options=detector_options, quick=quick,
                           progress=progress, several=len(data_dirs) > 1)


def _run_name(method: str, data: Path, seed: int, several: bool) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
    return f"{safe}-{data.name}-seed{seed}" if several else f"{safe}-seed{seed}"


def _run_matrix(
    configs: dict[tuple[str, Path, int], dict[str, Any]],
    pairs: list[tuple[Path, int]],
    out: Path,
    *,
    methods: Sequence[str],
    detectors: Sequence[str],
    epochs: int | None,
    extra: list[str],
    benchmark: str,
    open_sets: dict[str, str] | None,
    detector_options: dict[str, dict[str, Any]] | None,
    quick: bool,
    progress: bool,
    several: bool = False,
) -> dict[str, Any]:
    """The body of :func:`run_bench` in its claimed and locked directory."""
    started = time.perf_counter()
    reports: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    failures: list[dict[str, Any]] = []
    for data_dir, seed in pairs:
        for method in methods:
            config = configs[method, data_dir, seed]
            run_dir = out / "runs" / _run_name(method, data_dir, seed, several)
            print(f"[bench] {method} on {data_dir} seed {seed}", flush=True)
            try:
                report = _train_and_evaluate(config, data_dir, out, run_dir,
                                             detectors=detectors, open_sets=open_sets,
                                             detector_options=detector_options,
                                             progress=progress, several=several)
            except InputError:  # bad input fails every method alike: stop and say so
                raise
            except (OltrError, RuntimeError, MemoryError) as exc:  # one method's failure
                # (a non-finite loss, out of memory) is recorded; a bug in oltr still stops
                message = one_line(f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
                print(f"[bench] {method} on {data_dir} seed {seed} FAILED: {message}",
                      flush=True)
                failures.append({"method": method, "data": str(data_dir), "seed": seed,
                                 "error": message})
                continue
            reports[method].append(report)
    results = {
        "benchmark": benchmark,
        "data": [str(d) for d, _ in pairs] if several else str(pairs[0][0]),
        "methods": list(methods),
        "detectors": list(detectors),
        "seeds": [seed for _, seed in pairs],
        "epochs": epochs,
        "overrides": extra,
        "detector_options": detector_options or {},
        "quick": quick,
        "machine": machine_description(),
        "wall_seconds": time.perf_counter() - started,
        "summary": summarize(reports, detectors),
        "failures": failures,
        "reports": reports,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", format_results(results))
    return results


def _train_and_evaluate(config: dict[str, Any], data_dir: Path, out: Path, run_dir: Path, *,
                        detectors: Sequence[str], open_sets: dict[str, str] | None,
                        detector_options: dict[str, dict[str, Any]] | None, progress: bool,
                        several: bool) -> dict[str, Any]:
    """One run of the matrix: train (or reuse) its stages, evaluate it with every detector
    (or keep its current report), and return the report with its train seconds and epochs."""
    train_cached(config, data_dir, out, run_dir, progress=progress, data_digest=several)
    run = RunDir(run_dir)
    report = run.report()
    if report is None or not _report_is_current(report, run) or sorted(
            [*report.get("detectors", {}), *report.get("detectors_inapplicable", {})]
    ) != sorted(detectors) or (
            sorted(report.get("open_sets", {})) != sorted(open_sets or {})) or (
            report.get("detector_options", {}) != (detector_options or {})) or (
            "open_score_logits" not in report):  # written before that choice existed
        report = evaluate_run(run_dir, data_dir, open_set=True,
                              detectors=list(detectors), open_sets=open_sets,
                              detector_options=detector_options, output=run.report_path)
    names = [stage["name"] for stage in config["stages"]]
    report["train_seconds"] = _stage_seconds(run_dir, names)
    report["epochs"] = {name: stage_config(config, name)["train"]["epochs"] for name in names}
    return report


def _report_is_current(report: dict[str, Any], run: RunDir) -> bool:
    """Whether a kept report was computed from the weights the run's final stage holds now."""
    record = report.get("weights")
    if not isinstance(record, dict):
        return False
    weights = run.final_stage().weights_path
    return weights.is_file() and record.get("sha256") == sha256_file(weights)


def machine_description() -> str:
    """The machine a benchmark ran on, for its results (one line)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {device}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    finite = [v for v in values if v is not None]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n": len(finite)}


def summarize(reports: dict[str, list[dict[str, Any]]],
              detectors: Sequence[str]) -> dict[str, Any]:
    """Mean ± std (population std over seeds) of every headline figure, per method."""
    summary: dict[str, Any] = {}
    for method, runs in reports.items():
        entry: dict[str, Any] = {
            "closed": {c: _mean_std([r["closed"][c] for r in runs]) for c in CLOSED_COLUMNS},
            "open": {c: _mean_std([r["open"][c] for r in runs])
                     for c in (*OPEN_COLUMNS, *DETECTION_COLUMNS)},
            "train_minutes": _mean_std([r.get("train_seconds", 0.0) / 60 for r in runs]),
            "detectors": {
                name: {c: _mean_std([r["detectors"].get(name, {}).get(c) for r in runs])
                       for c in (*DETECTION_COLUMNS, "f_measure")}
                for name in detectors
            },
        }
        summary[method] = entry
    return summary
