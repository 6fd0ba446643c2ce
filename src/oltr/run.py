"""A run directory: the one reader and writer of its files.

::

    RUN/.oltr, RUN/<stage>/.oltr   oltr's markers: oltr resumes only what it wrote
                            (oltr.ownership); RUN/.oltr-lock is held while the run trains
    RUN/run.json            method, stages, the final stage, the data it was trained on
    RUN/config.yaml         the resolved config (all stages)
    RUN/<stage>/config.yaml the flat config of the stage
    RUN/<stage>/checkpoint.pt   last epoch: model, optimiser, scheduler (weights_only-safe)
    RUN/<stage>/model.safetensors + model.json   the best-on-val weights and what rebuilds them
                            (model.json: architecture, class names, train counts, data settings —
                            the model's metadata, as timm's pretrained_cfg / torchvision's Weights)
    RUN/<stage>/history.jsonl   one line per epoch
    RUN/decision.json + decision.safetensors   the decision rule fitted on val for the final
                            stage's weights (oltr.decision): τ's, open score and its state,
                            threshold; in the run, since a stage folder may be shared by runs
    RUN/report.json         the last evaluation (oltr.evaluation)

Every write is atomic (temporary file, fsync, rename: ``kill -9`` leaves the old or the new
file); JSON is read with :func:`oltr.io.read_json_object`, whose errors name the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from oltr.config import CHECKS, load_saved_config
from oltr.data.splits import leaves_root
from oltr.errors import InputError
from oltr.io import atomic_write_text, read_json_object, read_text

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
HISTORY = "history.jsonl"
RUN_INFO = "run.json"
CONFIG = "config.yaml"
REPORT = "report.json"
MODEL_INFO_KEYS = {"model": dict, "num_classes": int, "in_chans": int, "data": dict,
                   "class_names": list, "stage": str}
MODEL_DATA_KEYS = ("image_size", "channels", "mean", "std", "transform")


def final_stage_dir(run_dir: str | Path) -> Path:
    """The directory of a run's last stage (what evaluation, prediction and export load): the
    ``final_stage`` of ``run.json``, or ``run_dir`` itself when it holds a ``model.json``."""
    run_dir = Path(run_dir)
    info_path = run_dir / RUN_INFO
    if info_path.exists():
        description = read_json_object(info_path, "run description")
        final = description.get("final_stage")
        if not isinstance(final, str) or leaves_root(final) or "/" in final:
            raise InputError("final_stage must name a stage folder of the run", path=info_path,
                             value=final)
        stage_dir = run_dir / final
        if not (stage_dir / MODEL_INFO).exists():
            stages = description.get("stages") or [final]
            progress = "; ".join(f"{name}: {stage_progress(run_dir / str(name))}"
                                 for name in stages)
            raise InputError(
                f"the run is incomplete: its final stage '{final}' has no weights yet "
                f"({progress}); continue it with `oltr train … --out {run_dir} --resume`, or "
                "give a stage folder whose weights are saved (e.g. "
                f"{run_dir / str(stages[0])})", path=run_dir)
        return stage_dir
    if (run_dir / MODEL_INFO).exists():
        return run_dir
    raise InputError(f"not an oltr run directory (no {RUN_INFO} or {MODEL_INFO})", path=run_dir)


def stage_epochs(stage_dir: Path) -> tuple[int, int | None]:
    """``(finished epochs, epochs configured)`` of a stage folder: lines of ``history.jsonl``
    and ``train.epochs`` of its ``config.yaml`` (None when it has none)."""
    done = len(read_history(stage_dir)) if stage_dir.is_dir() else 0
    if not (stage_dir / CONFIG).is_file():
        return done, None
    return done, int(load_saved_config(stage_dir / CONFIG)["train"]["epochs"])


def stage_progress(stage_dir: Path) -> str:
    """How far a stage folder trained, in words: ``done``, ``epoch 5 of 30`` or
    ``not started``."""
    done, total = stage_epochs(stage_dir)
    if total is None:
        return "not started"
    return "done" if done >= total else f"epoch {done} of {total}"


def write_run_info(run_dir: Path, method: str, stage_names: list[str], data_dir: str | Path
                   ) -> None:
    """``run.json``: the method, its stages, the final stage and the data it trains on."""
    atomic_write_text(run_dir / RUN_INFO, json.dumps(
        {"method": method, "stages": stage_names, "final_stage": stage_names[-1],
         "data": str(data_dir)}, indent=2) + "\n")


def read_history(stage_dir: Path) -> list[dict[str, Any]]:
    """The epochs recorded in ``history.jsonl`` (InputError naming a damaged line)."""
    path = stage_dir / HISTORY
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(read_text(path, "training history").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"training history line is not valid JSON ({exc.msg}): the "
                             "history is damaged; restore it, or train into a new --out",
                             path=path, line=number) from None
        if not isinstance(record, dict):
            raise InputError("training history line must be a JSON object", path=path,
                             line=number)
        records.append(record)
    return records


def write_history(stage_dir: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(stage_dir / HISTORY, "".join(json.dumps(r) + "\n" for r in records))


def write_model_info(stage_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(stage_dir / MODEL_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_model_info(path: Path) -> dict[str, Any]:
    """``model.json``, checked: valid JSON with every key that rebuilds the network and its
    preprocessing, each of the right type (the config's checks for the data settings)."""
    info = read_json_object(path, "model description")
    for key, kind in MODEL_INFO_KEYS.items():
        if key not in info:
            raise InputError(f"lacks key '{key}' (tampered, or not written by oltr)", path=path)
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise InputError(f"key '{key}' must be a {kind.__name__}", path=path, value=info[key])
    missing = [key for key in MODEL_DATA_KEYS if key not in info["data"]]
    if missing:
        raise InputError(f"key 'data' lacks {missing}", path=path)
    data = info["data"]
    for key in MODEL_DATA_KEYS:  # the config's checks of the same settings
        description, test = CHECKS[f"data.{key}"]
        if not test(data[key]):
            raise InputError(f"key 'data.{key}' must be {description}", path=path,
                             value=data[key])
    for key in ("mean", "std"):
        if len(data[key]) != data["channels"]:
            raise InputError(f"key 'data.{key}' needs one value per channel (data.channels = "
                             f"{data['channels']})", path=path, value=data[key])
    if len(info["class_names"]) != info["num_classes"]:
        raise InputError(f"{len(info['class_names'])} class names for num_classes "
                         f"{info['num_classes']}", path=path)
    return info


def weights_digest(data_or_path: bytes | str | Path) -> str:
    """sha256 of weights (the bytes, or a file): what a decision rule or a report was computed
    for."""
    if isinstance(data_or_path, bytes):
        return hashlib.sha256(data_or_path).hexdigest()
    digest = hashlib.sha256()
    with open(data_or_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
