"""Configs: YAML presets with ``base:`` inheritance, ``key=value`` overrides and per-stage sections.

A config is a nested dict with the sections ``data``, ``model``, ``train`` and ``eval`` (every key
and its default lives in ``configs/base.yaml``). A method preset may list ``stages``; each stage
is a partial config applied on top of the method's own sections (OLTR: stage 1 = the plain model,
stage 2 = attention + meta-embedding + cosine classifier, paper §3.3 / DESIGN.md §2).
Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from oltr.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
DEFAULT_BENCHMARK = "fmnist_lt"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read config file: {exc.strerror}", path=path) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise InputError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}",
            path=path,
            line=None if line is None else line + 1,
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("a config file must hold a mapping at the top level", path=path)
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``update`` (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml_with_bases(path: str | Path) -> dict[str, Any]:
    """Load a YAML config; a ``base:`` key (path relative to the file) is loaded first."""
    path = Path(path)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if not base_path.exists():
        raise InputError("base config not found", path=path, value=str(base))
    return deep_merge(load_yaml_with_bases(base_path), data)


def check_keys(config: dict[str, Any], reference: dict[str, Any], where: str = "") -> None:
    """Raise ``InputError`` for any key of ``config`` that ``reference`` does not have."""
    for key, value in config.items():
        name = f"{where}.{key}" if where else key
        if key not in reference:
            valid = ", ".join(sorted(reference))
            raise InputError(f"unknown config key '{name}' (valid keys here: {valid})")
        if isinstance(reference[key], dict) and reference[key]:
            if not isinstance(value, dict):
                raise InputError(f"config key '{name}' must be a mapping", value=value)
            check_keys(value, reference[key], name)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``train.lr=0.05`` into ``{"train": {"lr": 0.05}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise InputError("an override must look like section.key=value", value=text)
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise InputError("an override must look like section.key=value", value=text)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise InputError(f"cannot parse the value of override: {exc}", value=text) from exc
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    nested: dict[str, Any] = {}
    cursor = nested
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = value
    return nested


def method_path(method: str, benchmark: str = DEFAULT_BENCHMARK) -> Path:
    """The preset file of ``method`` for ``benchmark`` (``configs/<benchmark>/<method>.yaml``)."""
    path = CONFIG_DIR / benchmark / f"{method}.yaml"
    if not path.exists():
        if not (CONFIG_DIR / benchmark).is_dir():
            raise InputError(
                f"unknown benchmark preset '{benchmark}' (available: {', '.join(list_benchmarks())})"
            )
        raise InputError(
            f"unknown method '{method}' for benchmark '{benchmark}' "
            f"(available: {', '.join(list_methods(benchmark))})"
        )
    return path


def list_benchmarks() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def list_methods(benchmark: str = DEFAULT_BENCHMARK) -> list[str]:
    return sorted(
        p.stem for p in (CONFIG_DIR / benchmark).glob("*.yaml") if not p.stem.startswith("_")
    )


def load_config(
    method: str | None = None,
    *,
    config_file: str | Path | None = None,
    benchmark: str = DEFAULT_BENCHMARK,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Resolve a full config: base ← method preset or config file ← ``key=value`` overrides.

    Overrides of a stage use the stage name as the first key, e.g.
    ``stage2.train.epochs=3``; plain ``train.epochs=3`` applies to every stage.
    """
    if (method is None) == (config_file is None):
        raise InputError("give exactly one of --method NAME or --config FILE")
    reference = _read_yaml(BASE_CONFIG)
    preset = load_yaml_with_bases(config_file if config_file else method_path(method, benchmark))
    config = deep_merge(reference, preset)
    stages = config.pop("stages", None) or [{"name": "main"}]
    stage_names = [stage.get("name") for stage in stages]
    if any(not isinstance(name, str) for name in stage_names) or len(set(stage_names)) != len(
        stage_names
    ):
        raise InputError("every stage needs a unique 'name'", value=stage_names)
    stage_overrides: dict[str, dict[str, Any]] = {name: {} for name in stage_names}
    for text in overrides:
        update = parse_override(text)
        (first,) = update
        if first in stage_overrides:
            stage_overrides[first] = deep_merge(stage_overrides[first], update[first])
        else:
            config = deep_merge(config, update)
    check_keys(config, reference)
    resolved_stages = []
    for stage in stages:
        body = {k: v for k, v in stage.items() if k != "name"}
        check_keys(body, reference, f"stages[{stage['name']}]")
        body = deep_merge(body, stage_overrides[stage["name"]])
        check_keys(body, reference, stage["name"])
        resolved_stages.append({"name": stage["name"], **body})
    config["stages"] = resolved_stages
    if config.get("method") is None:
        config["method"] = method or Path(config_file).stem  # type: ignore[arg-type]
    return config


def stage_config(config: dict[str, Any], stage_name: str) -> dict[str, Any]:
    """The flat config (data/model/train/eval) of one stage."""
    for stage in config["stages"]:
        if stage["name"] == stage_name:
            body = {k: v for k, v in stage.items() if k != "name"}
            flat = {k: v for k, v in config.items() if k != "stages"}
            return deep_merge(flat, body) | {"stage": stage_name}
    raise InputError(f"no stage named '{stage_name}'", value=[s["name"] for s in config["stages"]])


def save_config(config: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
