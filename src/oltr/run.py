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

:class:`RunDir` and :class:`StageDir` are the only readers and writers of these files (the
decision rule's own format is `oltr.decision`'s, the checkpoint's `oltr.train.checkpoint`'s:
they take the paths from here); each object reads ``run.json``, a ``config.yaml`` and
``model.json`` at most once. Every write is atomic (temporary file, fsync, rename: ``kill -9``
leaves the old or the new file); JSON is read with :func:`oltr.io.read_json_object`, whose
errors name the file.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oltr.config import CHECKS, load_saved_config, save_config, stage_config, with_defaults
from oltr.data.splits import leaves_root
from oltr.decision import DECISION_JSON
from oltr.errors import InputError
from oltr.io import atomic_write, atomic_write_text, read_json_object, read_text

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


class StageDir:
    """A stage folder of a run: the only reader and writer of its files (``config.yaml``,
    ``checkpoint.pt``'s path, ``model.safetensors`` + ``model.json``, ``history.jsonl``).
    ``config()`` and ``model_info()`` read their file once per object; the history is read
    anew on each call (a stage that trains appends to it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._config: dict[str, Any] | None = None
        self._model_info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"StageDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The stage's folder name (its name in the run)."""
        return self.path.name

    @property
    def config_path(self) -> Path:
        """``config.yaml``: the flat config of the stage."""
        return self.path / CONFIG

    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.pt``: the last epoch's training state (`oltr.train.checkpoint`)."""
        return self.path / CHECKPOINT

    @property
    def weights_path(self) -> Path:
        """``model.safetensors``: the best-on-val weights."""
        return self.path / WEIGHTS

    @property
    def model_info_path(self) -> Path:
        """``model.json``: what rebuilds the network of the weights."""
        return self.path / MODEL_INFO

    @property
    def history_path(self) -> Path:
        """``history.jsonl``: one line per finished epoch."""
        return self.path / HISTORY

    def has_config(self) -> bool:
        """Whether the stage saved its ``config.yaml`` (it started)."""
        return self.config_path.is_file()

    def has_model_info(self) -> bool:
        """Whether ``model.json`` exists (the stage selected weights)."""
        return self.model_info_path.exists()

    def has_checkpoint(self) -> bool:
        """Whether ``checkpoint.pt`` exists (the stage finished an epoch)."""
        return self.checkpoint_path.exists()

    def has_weights(self) -> bool:
        """Whether ``model.safetensors`` exists."""
        return self.weights_path.exists()

    def config(self) -> dict[str, Any]:
        """The stage's saved flat config, completed by the defaults (read once; a copy).

        Raises:
            InputError: naming ``config.yaml`` when it is missing or damaged.
        """
        if self._config is None:
            self._config = load_saved_config(self.config_path)
        return copy.deepcopy(self._config)

    def save_config(self, cfg: dict[str, Any]) -> None:
        """Write the stage's ``config.yaml`` (atomically)."""
        save_config(cfg, self.config_path)
        self._config = None

    def model_info(self) -> dict[str, Any]:
        """``model.json``, checked (:func:`read_model_info`; read once; a copy).

        Raises:
            InputError: naming ``model.json`` when it is missing, damaged or incomplete.
        """
        if self._model_info is None:
            self._model_info = read_model_info(self.model_info_path)
        return copy.deepcopy(self._model_info)

    def write_model(self, write_weights: Callable[[Path], None], info: dict[str, Any]) -> None:
        """The selected weights (``write_weights(tmp)`` writes ``model.safetensors`` to a
        temporary file, renamed into place), then ``model.json`` (``info``)."""
        atomic_write(self.weights_path, write_weights)
        atomic_write_text(self.model_info_path,
                          json.dumps(info, indent=2, sort_keys=True) + "\n")
        self._model_info = None

    def history(self) -> list[dict[str, Any]]:
        """The epochs recorded in ``history.jsonl`` (empty without one).

        Raises:
            InputError: naming a damaged line.
        """
        path = self.history_path
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(read_text(path, "training history").splitlines(),
                                      start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"training history line is not valid JSON ({exc.msg}): the "
                                 "history is damaged; restore it, or train into a new --out",
                                 path=path, line=number) from None
            except RecursionError:
                raise InputError("training history line is nested too deeply to be read as "
                                 "JSON: the history is damaged; restore it, or train into a "
                                 "new --out", path=path, line=number) from None
            if not isinstance(record, dict):
                raise InputError("training history line must be a JSON object", path=path,
                                 line=number)
            records.append(record)
        return records

    def write_history(self, records: list[dict[str, Any]]) -> None:
        """Write ``history.jsonl`` (atomically), one line per record."""
        atomic_write_text(self.history_path, "".join(json.dumps(r) + "\n" for r in records))

    def epochs(self) -> tuple[int, int | None]:
        """``(finished epochs, epochs configured)``: lines of ``history.jsonl`` and
        ``train.epochs`` of ``config.yaml`` (None when it has none)."""
        done = len(self.history()) if self.path.is_dir() else 0
        if not self.has_config():
            return done, None
        return done, int(self.config()["train"]["epochs"])

    def progress(self) -> str:
        """How far the stage trained, in words: ``done``, ``epoch 5 of 30`` or
        ``not started``."""
        done, total = self.epochs()
        if total is None:
            return "not started"
        return "done" if done >= total else f"epoch {done} of {total}"


class RunDir:
    """A run directory: the only reader and writer of its files (``run.json``, ``config.yaml``,
    its stages, the decision rule's paths, ``report.json``). ``run.json`` and ``config.yaml``
    are read once per object. A folder holding a ``model.json`` but no ``run.json`` (a stage
    folder given as a run) is its own final stage."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._info: dict[str, Any] | None = None
        self._config: dict[str, Any] | None = None
        self._final: StageDir | None = None
        self._stage_config: dict[str, Any] | None = None

    @classmethod
    def of(cls, run: str | Path | RunDir) -> RunDir:
        """``run`` itself when it is a RunDir, else the RunDir of that path."""
        return run if isinstance(run, RunDir) else cls(run)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def info_path(self) -> Path:
        """``run.json``: method, stages, final stage, data."""
        return self.path / RUN_INFO

    @property
    def config_path(self) -> Path:
        """``config.yaml``: the resolved config of all stages."""
        return self.path / CONFIG

    @property
    def report_path(self) -> Path:
        """``report.json``: the last evaluation."""
        return self.path / REPORT

    @property
    def decision_path(self) -> Path:
        """``decision.json``: the run's decision rule (with ``decision.safetensors``)."""
        return self.path / DECISION_JSON

    def has_info(self) -> bool:
        """Whether ``run.json`` exists."""
        return self.info_path.exists()

    def has_checkpoint(self) -> bool:
        """Whether a stage folder of the run holds a ``checkpoint.pt`` (an epoch finished)."""
        return self.path.is_dir() and any(self.path.glob(f"*/{CHECKPOINT}"))

    def has_decision(self) -> bool:
        """Whether the run saved a decision rule."""
        return self.decision_path.exists()

    def info(self) -> dict[str, Any]:
        """``run.json`` (read once).

        Raises:
            InputError: naming ``run.json`` when it is missing or not a JSON object.
        """
        if self._info is None:
            self._info = read_json_object(self.info_path, "run description")
        return self._info

    def write_info(self, method: str, stage_names: list[str], data_dir: str | Path) -> None:
        """``run.json``: the method, its stages, the final stage and the data it trains on."""
        atomic_write_text(self.info_path, json.dumps(
            {"method": method, "stages": stage_names, "final_stage": stage_names[-1],
             "data": str(data_dir)}, indent=2) + "\n")
        self._info = None

    @property
    def data_dir(self) -> Path | None:
        """The benchmark the run trained on (``run.json``'s ``data``); None without a
        ``run.json`` or when it names none."""
        if not self.info_path.is_file():
            return None
        data = self.info().get("data")
        return Path(data) if isinstance(data, str) and data else None

    @property
    def method(self) -> Any:
        """``run.json``'s ``method`` (None when it has none)."""
        return self.info().get("method")

    def config(self) -> dict[str, Any]:
        """The run's saved config (all stages), completed by the defaults (read once; a copy).

        Raises:
            InputError: naming ``config.yaml`` when it is missing or damaged.
        """
        if self._config is None:
            self._config = load_saved_config(self.config_path)
        return copy.deepcopy(self._config)

    def save_config(self, config: dict[str, Any]) -> None:
        """Write the run's ``config.yaml`` (atomically)."""
        save_config(config, self.config_path)
        self._config = self._stage_config = None

    def stage(self, name: str) -> StageDir:
        """The stage folder ``name`` of the run (it need not exist)."""
        return StageDir(self.path / name)

    def final_stage(self) -> StageDir:
        """The run's last stage (what evaluation, prediction and export load): the
        ``final_stage`` of ``run.json``, or the folder itself when it holds a ``model.json``.

        Raises:
            InputError: ``final_stage`` names no stage folder of the run; the final stage has
                no weights yet (naming each stage's progress); not a run directory.
        """
        if self._final is None:
            self._final = self._find_final_stage()
        return self._final

    def _find_final_stage(self) -> StageDir:
        run_dir = self.path
        if self.info_path.exists():
            description = self.info()
            final = description.get("final_stage")
            if not isinstance(final, str) or leaves_root(final) or "/" in final:
                raise InputError("final_stage must name a stage folder of the run",
                                 path=self.info_path, value=final)
            stage = self.stage(final)
            if not stage.has_model_info():
                stages = description.get("stages") or [final]
                progress = "; ".join(f"{name}: {self.stage(str(name)).progress()}"
                                     for name in stages)
                raise InputError(
                    f"the run is incomplete: its final stage '{final}' has no weights yet "
                    f"({progress}); continue it with `oltr train … --out {run_dir} --resume`, "
                    "or give a stage folder whose weights are saved (e.g. "
                    f"{run_dir / str(stages[0])})", path=run_dir)
            return stage
        if (run_dir / MODEL_INFO).exists():
            return StageDir(run_dir)
        raise InputError(f"not an oltr run directory (no {RUN_INFO} or {MODEL_INFO})",
                         path=run_dir)

    def stage_config(self) -> dict[str, Any]:
        """The resolved config of the final stage, as the *run* saved it (``RUN/config.yaml``):
        a stage folder shared by several runs (``oltr bench``'s cache: plain, τ-norm and
        post-hoc logit adjustment train the same stage) keeps the config of the run that
        trained it, but each run decides with its own ``eval`` settings. Falls back to the
        stage's own config. Read once; a copy.

        Raises:
            InputError: as :meth:`final_stage`; naming a missing or damaged ``config.yaml``.
        """
        if self._stage_config is None:
            stage = self.final_stage()
            cfg = stage.config()
            if self.config_path.exists() and stage.path.parent == self.path:
                config = self.config()
                if "stages" in config and stage.name in [s["name"] for s in config["stages"]]:
                    cfg = stage_config(with_defaults(config), stage.name)
            self._stage_config = cfg
        return copy.deepcopy(self._stage_config)

    def report(self) -> dict[str, Any] | None:
        """``report.json``, or None without one.

        Raises:
            InputError: naming ``report.json`` when it is not a JSON object.
        """
        if not self.report_path.exists():
            return None
        return read_json_object(self.report_path, "report")


def final_stage_dir(run_dir: str | Path) -> Path:
    """The directory of a run's last stage (:meth:`RunDir.final_stage`)."""
    return RunDir(run_dir).final_stage().path


def read_history(stage_dir: Path) -> list[dict[str, Any]]:
    """The epochs recorded in ``history.jsonl`` (:meth:`StageDir.history`)."""
    return StageDir(stage_dir).history()


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
