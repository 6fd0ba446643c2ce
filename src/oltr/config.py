"""Configs: YAML presets with ``base:`` inheritance, ``key=value`` overrides and per-stage sections.

A config is a nested dict with the sections ``data``, ``model``, ``train`` and ``eval`` (every key
and its default lives in ``configs/base.yaml``). A method preset may list ``stages``; each stage
is a partial config applied on top of the method's own sections (OLTR: stage 1 = the plain model,
stage 2 = attention + meta-embedding + cosine classifier, paper §3.3 / docs/method.md).
Unknown keys are errors, never silently ignored; every value is checked in one place
(`validate_config`), so a bad value fails before any data is read, naming its key.

The allowed names of a component key are its registry's (:class:`oltr.registry.Registry`),
read when a config is checked: ``train.loss`` / ``train.feature_loss`` / ``train.centroid_loss``
(:mod:`oltr.losses`), ``model.classifier`` (:data:`oltr.models.heads.HEADS`), ``train.sampler``
(:data:`oltr.data.samplers.SAMPLERS`), ``eval.open_score`` (:data:`oltr.detectors.DETECTORS`).
Method presets are the files of ``configs/<benchmark>/`` plus those registered with
:func:`register_method`.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from oltr.data.samplers import SAMPLERS
from oltr.data.transforms import PRESETS
from oltr.detectors import DETECTORS, rule_detector
from oltr.errors import InputError, bounded_repr
from oltr.io import DuplicateKey, UniqueKeyLoader, atomic_write_text, read_text
from oltr.losses import CENTROID_LOSSES, CLASSIFICATION_LOSSES, FEATURE_LOSSES
from oltr.models.classifiers import SQUASH_FORMS
from oltr.models.heads import HEADS
from oltr.registry import Registry

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
DEFAULT_BENCHMARK = "fmnist_lt"
#: ``oltr bench``'s default matrix: the paper's Tab. 3 methods plus later long-tail methods
#: (presets in configs/<benchmark>/), in table order, and the open-set detectors.
COMPARISON_METHODS = (
    "plain", "class_aware", "focal", "range_loss", "lifted_loss", "fslwf",
    "crt", "tau_norm", "lws", "balanced_softmax", "logit_adjustment", "ldam_drw", "oltr",
)


def _comparison_detectors() -> tuple[str, ...]:
    """Every registered detector in the registry's order, except that ``knn`` comes before
    ``reachability``: the column order of the published bench tables (README.md,
    benchmarks/README.md)."""
    names = list(DETECTORS)
    if "knn" in names and "reachability" in names:
        names.remove("knn")
        names.insert(names.index("reachability"), "knn")
    return tuple(names)


#: Every detector of :mod:`oltr.detectors` (``oltr bench``'s default: the comparison is run with all).
COMPARISON_DETECTORS = _comparison_detectors()
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


#: Largest config, preset or protocol file read (a config is a few KiB).
MAX_CONFIG_BYTES = 16 << 20

#: Most YAML nodes a user file may expand to (aliases counted every time they are used): a
#: config has a few hundred; a "billion laughs" file of a few hundred bytes expands to 10⁹.
MAX_YAML_NODES = 100_000


class _Oversized(Exception):
    pass


class _BoundedLoader(UniqueKeyLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in a mapping
    (`oltr.io.UniqueKeyLoader`) and a document expanding to more than ``MAX_YAML_NODES`` nodes
    (or holding a recursive alias) before constructing any Python object."""

    def construct_document(self, node: yaml.Node) -> Any:
        _count_nodes(node, {}, MAX_YAML_NODES)
        return super().construct_document(node)


def _count_nodes(node: yaml.Node, sizes: dict[int, int], limit: int) -> int:
    """Nodes of ``node`` fully expanded (each alias use counts again), memoised per node."""
    key = id(node)
    if key in sizes:
        if sizes[key] < 0:
            raise _Oversized("a recursive YAML alias (an anchor used inside itself)")
        return sizes[key]
    sizes[key] = -1
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_count_nodes(child, sizes, limit) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_count_nodes(k, sizes, limit) + _count_nodes(v, sizes, limit)
                       for k, v in node.value)
    else:
        size = 1
    if size > limit:
        raise _Oversized(f"YAML aliases expand to more than {limit} values (an alias bomb?)")
    sizes[key] = size
    return size


def _load_document(text: str, path: str | Path | None) -> tuple[Any, yaml.Node | None]:
    """The value of YAML ``text`` and its node tree (None for an empty document)."""
    loader = _BoundedLoader(text)  # a SafeLoader: no arbitrary objects
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    except _Oversized as exc:
        raise InputError(str(exc), path=path) from None
    except RecursionError:
        raise InputError("YAML nested too deeply", path=path) from None
    except DuplicateKey as exc:
        where = f" (line {exc.line})" if path is None else ""
        raise InputError(f"{exc}{where}", path=path,
                         line=None if path is None else exc.line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f" at column {mark.column + 1}" if mark is not None and path is None else ""
        raise InputError(f"invalid YAML: {problem}{where}", path=path,
                         line=None if mark is None or path is None else mark.line + 1) from None
    finally:
        loader.dispose()


def load_yaml(text: str, *, path: str | Path | None = None) -> Any:
    """Parse YAML ``text`` as ``yaml.safe_load`` does, refusing alias expansion beyond
    ``MAX_YAML_NODES`` nodes and recursive aliases; every YAML read of a user's text goes
    through here. InputError (naming ``path`` and the line) on any problem."""
    return _load_document(text, path)[0]


def _key_lines(node: yaml.Node | None) -> dict[str, int]:
    """The 1-based line of every key of a config document, by dotted name (``train.lr``); the
    keys of a stage in the ``stages`` list are named after the stage (``stage2.train.lr``)."""
    lines: dict[str, int] = {}

    def walk(mapping: yaml.Node, prefix: str) -> None:
        if not isinstance(mapping, yaml.MappingNode):
            return
        for key, value in mapping.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            name = f"{prefix}{key.value}"
            lines[name] = key.start_mark.line + 1
            if name == "stages" and isinstance(value, yaml.SequenceNode):
                for stage in value.value:
                    if not isinstance(stage, yaml.MappingNode):
                        continue
                    for k, v in stage.value:
                        if k.value == "name" and isinstance(v, yaml.ScalarNode):
                            lines[v.value] = stage.start_mark.line + 1
                            walk(stage, f"{v.value}.")
            else:
                walk(value, f"{name}.")

    if node is not None:
        walk(node, "")
    return lines


def read_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from ``path`` (read by `oltr.io.read_text`, parsed by :func:`load_yaml`);
    InputError naming the file (and line) when it cannot be read, is not UTF-8, not YAML or
    not a mapping."""
    return _read_yaml_lines(path, what)[0]


def _read_yaml_lines(path: Path, what: str = "config file") -> tuple[dict[str, Any], dict[str, int]]:
    """:func:`read_yaml` and the line of each key (:func:`_key_lines`)."""
    text = read_text(path, what, MAX_CONFIG_BYTES)
    data, node = _load_document(text, path)
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise InputError(f"a {what} must hold a mapping at the top level", path=path)
    return data, _key_lines(node)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``update`` (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Origins(dict[str, tuple[Path, int]]):
    """Where each key of a config was written: dotted name (``train.lr``, a stage's
    ``stage2.train.lr``) → (file, 1-based line). Keys from ``configs/base.yaml`` or from a
    ``key=value`` override have none."""

    def locate(self, name: str) -> dict[str, Any]:
        """``path``/``line`` keyword arguments of an :class:`InputError` about key ``name``
        (``stages[stage2].train.lr`` is looked up as ``stage2.train.lr``); empty if unknown."""
        name = re.sub(r"^stages\[([^\]]+)\]\.", r"\1.", name)
        if name not in self:
            return {}
        path, line = self[name]
        return {"path": path, "line": line}


def load_yaml_with_bases(path: str | Path) -> dict[str, Any]:
    """Load a YAML config; a ``base:`` key (path relative to the file) is loaded first."""
    return _load_with_origins(Path(path))[0]


def _load_with_origins(path: Path) -> tuple[dict[str, Any], Origins]:
    """:func:`load_yaml_with_bases` and where each key was written (the last file wins)."""
    data, lines = _read_yaml_lines(path)
    base = data.pop("base", None)
    origins = Origins({name: (path, line) for name, line in lines.items() if name != "base"})
    if base is None:
        return data, origins
    base_path = (path.parent / base).resolve()
    if not base_path.exists():
        raise InputError("base config not found", path=path, line=lines.get("base"),
                         value=str(base))
    base_data, base_origins = _load_with_origins(base_path)
    return deep_merge(base_data, data), Origins(base_origins | origins)


def check_keys(config: dict[str, Any], reference: dict[str, Any], where: str = "",
               origins: Origins | None = None, *, _root: dict[str, Any] | None = None,
               _section: tuple[str, ...] = ()) -> None:
    """Raise ``InputError`` for any key of ``config`` that ``reference`` does not have (naming
    the file and line that wrote it when ``origins`` knows them, and the nearest valid keys:
    :func:`suggest_keys`, a stage's prefix kept)."""
    locate = (origins or Origins()).locate
    root = reference if _root is None else _root
    for key, value in config.items():
        name = f"{where}.{key}" if where else key
        if key not in reference:
            valid = ", ".join(sorted(reference))
            relative = ".".join((*_section, str(key)))
            prefix = name[:len(name) - len(relative)]  # a stage's "stage1." / "stages[s]."
            hint = did_you_mean([prefix + k for k in suggest_keys(relative, root)])
            raise InputError(f"unknown config key '{name}' (valid keys here: {valid}){hint}",
                             **locate(name))
        if isinstance(reference[key], dict) and reference[key]:
            if not isinstance(value, dict):
                raise InputError(f"config key '{name}' must be a mapping", value=value,
                                 **locate(name))
            check_keys(value, reference[key], name, origins, _root=root,
                       _section=(*_section, key))


def _valid_keys(reference: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of ``reference`` (sections and the keys in them), ``stages`` aside."""
    keys: list[str] = []
    for key, value in reference.items():
        if key == "stages":
            continue
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict) and value:
            keys += _valid_keys(value, f"{prefix}{key}.")
    return keys


def suggest_keys(key: str, reference: dict[str, Any]) -> list[str]:
    """The valid dotted keys of ``reference`` (base.yaml) nearest to the unknown ``key``: the
    keys of the same name in another section (``epochs`` → ``train.epochs``), else
    :func:`difflib.get_close_matches` on the dotted key (``train.epoch`` → ``train.epochs``);
    empty when nothing is close."""
    valid = _valid_keys(reference)
    leaf = key.rsplit(".", 1)[-1]
    same_name = [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k != key]
    if same_name:
        return same_name
    return difflib.get_close_matches(key, valid, n=3, cutoff=0.8)


def did_you_mean(keys: list[str]) -> str:
    """``"; did you mean 'a'?"`` (``'a' or 'b'``, ``'a', 'b' or 'c'``); empty for no keys."""
    if not keys:
        return ""
    quoted = [f"'{k}'" for k in keys]
    alternatives = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f"; did you mean {alternatives}?"


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``train.lr=0.05`` into ``{"train": {"lr": 0.05}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise InputError("an override must look like section.key=value", value=text)
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise InputError("an override must look like section.key=value", value=text)
    try:
        value = load_yaml(raw)
    except InputError as exc:
        raise InputError(f"cannot parse the value of override: {exc}", value=text) from None
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    nested: dict[str, Any] = {}
    cursor = nested
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = value
    return nested


#: Method presets defined outside the package (:func:`register_method`): name → a YAML file or
#: a mapping. They are offered for every benchmark, next to the files of
#: ``configs/<benchmark>/`` (:func:`list_methods`).
METHODS: Registry[Path | dict[str, Any]] = Registry("method")


def register_method(name: str, preset: str | os.PathLike[str] | Mapping[str, Any]) -> None:
    """Make ``preset`` the method ``name`` of every benchmark, found by name like a packaged
    preset (``load_config(name)``, ``run_bench(methods=[name])``) and checked when it is
    loaded, as a packaged preset is.

    ``preset`` is a YAML file as ``--config`` takes (its ``base:`` relative to the file) or a
    mapping of the same keys (its ``base:``, e.g. ``_base.yaml``, relative to the benchmark's
    preset folder ``configs/<benchmark>/``, as a packaged preset's is; the mapping is copied).

    Raises:
        InputError: a name that is not a plain folder name (letters, digits, ``_`` and ``-``)
            or that a packaged preset (of any benchmark) or a registered method already has; a
            file that does not exist; a preset that is neither a file nor a mapping.
    """
    if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
        raise InputError("a method name must be a plain folder name (letters, digits, _ and -)",
                         value=name)
    if name in {path.stem for path in CONFIG_DIR.glob("*/*.yaml")}:
        raise InputError("a method of this name is already registered (a packaged preset)",
                         value=name)
    if isinstance(preset, Mapping):
        METHODS.register(name, copy.deepcopy(dict(preset)))
        return
    if not isinstance(preset, (str, os.PathLike)):
        raise InputError("a method preset is a YAML file or a mapping", value=preset)
    path = Path(preset).expanduser().resolve()
    if not path.is_file():
        raise InputError("method preset not found", path=path)
    METHODS.register(name, path)


def method_preset(method: str, benchmark: str = DEFAULT_BENCHMARK) -> Path | dict[str, Any]:
    """The preset of ``method`` for ``benchmark``: its file (``configs/<benchmark>/<method>.yaml``,
    or the file :func:`register_method` was given) or the mapping it was given (a copy).

    Raises:
        InputError: an unknown benchmark or method (listing the available ones).
    """
    path = CONFIG_DIR / benchmark / f"{method}.yaml"
    if path.exists():
        return path
    if not (CONFIG_DIR / benchmark).is_dir():
        raise InputError(
            f"unknown benchmark preset '{benchmark}' (available: {', '.join(list_benchmarks())})"
        )
    if method in METHODS:
        preset = METHODS[method]
        return copy.deepcopy(preset) if isinstance(preset, dict) else preset
    raise InputError(
        f"unknown method '{method}' for benchmark '{benchmark}' "
        f"(available: {', '.join(list_methods(benchmark))})"
    )


def method_path(method: str, benchmark: str = DEFAULT_BENCHMARK) -> Path:
    """The preset file of ``method`` for ``benchmark`` (:func:`method_preset`).

    Raises:
        InputError: an unknown benchmark or method, or a method registered as a mapping.
    """
    preset = method_preset(method, benchmark)
    if not isinstance(preset, Path):
        raise InputError(f"method '{method}' was registered as a mapping, not a file")
    return preset


def list_benchmarks() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def list_methods(benchmark: str = DEFAULT_BENCHMARK) -> list[str]:
    """Method presets of ``benchmark`` (not ``_base.yaml`` nor the curation ``protocol.yaml``)
    and the methods registered with :func:`register_method`, sorted."""
    return sorted({
        *(p.stem for p in (CONFIG_DIR / benchmark).glob("*.yaml")
          if not p.stem.startswith("_") and p.stem != "protocol"),
        *METHODS,
    })


def _load_mapping(preset: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A method preset given as a mapping, its ``base:`` (relative to ``folder``) loaded first."""
    data = copy.deepcopy(preset)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (folder / str(base)).resolve()
    if not base_path.exists():
        raise InputError("base config not found", value=str(base))
    return deep_merge(load_yaml_with_bases(base_path), data)


def load_config(
    method: str | None = None,
    *,
    config_file: str | Path | None = None,
    benchmark: str = DEFAULT_BENCHMARK,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Resolve a full config: base ← method preset or config file ← ``key=value`` overrides.

    Overrides of a stage use the stage name as the first key, e.g.
    ``stage2.train.epochs=3``; plain ``train.epochs=3`` applies to every stage that does not
    set ``train.epochs`` itself (the stage's own value wins; a ``UserWarning`` names each stage
    a plain override does not reach).
    """
    if (method is None) == (config_file is None):
        raise InputError("give exactly one of a method preset (--method NAME; method=) or a "
                         "config file (--config FILE; config_file=)")
    if isinstance(overrides, str):  # one override, not a sequence of its characters
        overrides = [overrides]
    reference = read_yaml(BASE_CONFIG)
    source = Path(config_file) if config_file else method_preset(method, benchmark)
    preset_path = source if isinstance(source, Path) else None
    if isinstance(source, Path):
        preset, origins = _load_with_origins(source)
    else:  # a registered mapping: no file lines to name
        preset, origins = _load_mapping(source, CONFIG_DIR / benchmark), Origins()
    # the file's own shape, before overrides can hide it (``train: 3`` + ``train.lr=…``)
    check_keys(preset, reference, origins=origins)
    config = deep_merge(reference, preset)
    stages = config.pop("stages", None)
    stages = [{"name": "main"}] if stages is None or stages == [] else stages
    _check_stages(stages, origins.get("stages", (preset_path, None)))
    stage_names = [stage["name"] for stage in stages]
    stage_overrides: dict[str, dict[str, Any]] = {name: {} for name in stage_names}
    global_overrides: list[tuple[str, str]] = []  # (override, a dotted key it sets)
    for text in overrides:
        update = parse_override(text)
        (first,) = update
        if first == "stages":
            raise InputError("a method's stages cannot be set by an override; write them in a "
                             "config file (--config)", value=text)
        if first not in reference and first not in stage_overrides:
            raise InputError(
                f"unknown config key '{first}' in an override: neither a section "
                f"({', '.join(k for k in reference if k != 'stages')}) nor a stage of this "
                f"method ({', '.join(stage_names)})"
                f"{did_you_mean(suggest_keys(next(iter(_flatten(update))), reference))}",
                value=text)
        if first in stage_overrides:
            stage_overrides[first] = deep_merge(stage_overrides[first], update[first])
        else:
            config = deep_merge(config, update)
            global_overrides += [(text, key) for key in _flatten(update)]
        for key in _flatten(update):  # the value is the override's now, not the file's
            origins.pop(key, None)
    check_keys(config, reference)
    resolved_stages = []
    for stage in stages:
        body = {k: v for k, v in stage.items() if k != "name"}
        check_keys(body, reference, f"stages[{stage['name']}]", origins)
        own, overridden = _flatten(body), _flatten(stage_overrides[stage["name"]])
        for text, key in global_overrides:
            if key in own and key not in overridden:
                warnings.warn(
                    f"override {text} does not reach stage '{stage['name']}', which sets "
                    f"{key} itself ({own[key]!r}); write {stage['name']}.{key}=… to change it "
                    "there", UserWarning, stacklevel=2)
        body = deep_merge(body, stage_overrides[stage["name"]])
        check_keys(body, reference, stage["name"])
        resolved_stages.append({"name": stage["name"], **body})
    config["stages"] = resolved_stages
    if config.get("method") is None:
        config["method"] = method or Path(config_file).stem  # type: ignore[arg-type]
    validate_config(config, origins)
    return config


_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_TOP_LEVEL_KEYS = ("method", "seed", "deterministic", "device", "stages", "data", "model",
                   "train", "eval")


def _check_stages(stages: Any, where: tuple[Path, int | None]) -> None:
    """``stages``: a list of mappings, each with a unique ``name`` that is a plain folder name
    (the stage's folder in the run) and not a config section (``train.lr=…`` must stay
    unambiguous). ``where``: the file and line of the ``stages`` key."""
    path, line = where
    if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
        raise InputError("config key 'stages' must be a list of mappings, each with a 'name' "
                         "(and optional data/model/train/eval sections)", path=path, line=line,
                         value=stages)
    names = [stage.get("name") for stage in stages]
    if any(not isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise InputError("every stage needs a unique 'name'", path=path, line=line, value=names)
    for name in names:
        if not _STAGE_NAME.fullmatch(name) or name in _TOP_LEVEL_KEYS:
            raise InputError("a stage name must be a plain folder name (letters, digits, _ and "
                             f"-) other than a config key ({', '.join(_TOP_LEVEL_KEYS)})",
                             path=path, line=line, value=name)


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """The keys whose values differ between two configs (whole-run or one stage's), as
    ``train.lr: 0.1 → 0.05; stage2.train.epochs: 4 → 6`` (the first ``limit``, then a count)."""
    def flat(config: dict[str, Any]) -> dict[str, Any]:
        values = _flatten({k: v for k, v in config.items() if k != "stages"})
        stages = config.get("stages")
        if isinstance(stages, list):
            values["stages"] = [s.get("name") for s in stages if isinstance(s, dict)]
            for stage in stages:
                if isinstance(stage, dict):
                    own = _flatten({k: v for k, v in stage.items() if k != "name"})
                    values |= {f"{stage.get('name')}.{k}": v for k, v in own.items()}
        return values

    before, after = flat(old), flat(new)
    unset = object()
    keys = [k for k in sorted(set(before) | set(after))
            if before.get(k, unset) != after.get(k, unset)]

    def shown(value: Any) -> str:
        return "(unset)" if value is unset else bounded_repr(value)

    parts = [f"{k}: {shown(before.get(k, unset))} → {shown(after.get(k, unset))}"
             for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


#: Config keys holding a file or folder path (``train.init_from`` except its words).
PATH_KEYS = (("data", "image_root"), ("model", "pretrained_path"), ("train", "init_from"))


def absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a copy) with every relative path of :data:`PATH_KEYS`, in its sections and
    in each stage, made absolute against the working directory (``~`` expanded): a run's
    saved config then names the same files from wherever it is evaluated."""
    config = copy.deepcopy(config)
    for holder in [config, *config.get("stages", [])]:
        for section, key in PATH_KEYS:
            value = holder.get(section, {}).get(key)
            if isinstance(value, str) and value not in ("previous", "none"):
                holder[section][key] = os.path.abspath(os.path.expanduser(value))
    return config


def stage_config(config: dict[str, Any], stage_name: str) -> dict[str, Any]:
    """The flat config (data/model/train/eval) of one stage."""
    for stage in config["stages"]:
        if stage["name"] == stage_name:
            body = {k: v for k, v in stage.items() if k != "name"}
            flat = {k: v for k, v in config.items() if k != "stages"}
            return deep_merge(flat, body) | {"stage": stage_name}
    raise InputError(f"no stage named '{stage_name}'", value=[s["name"] for s in config["stages"]])


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the keys it lacks taken from ``configs/base.yaml`` (a run or stage config
    saved before a key was added compares equal to one resolved now)."""
    reference = read_yaml(BASE_CONFIG)
    if "stages" not in config:  # a stage's flat config
        del reference["stages"]
    return deep_merge(reference, config)


def load_saved_config(path: str | Path) -> dict[str, Any]:
    """A config saved with a run (whole run or one stage), completed by :func:`with_defaults`."""
    path = Path(path)
    if not path.is_file():
        raise InputError("the run's saved config is missing", path=path)
    return with_defaults(read_yaml(path))


def save_config(config: dict[str, Any], path: str | Path) -> None:
    """Write ``config`` as YAML atomically (temp file + rename): a kill leaves old or new."""
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


# --------------------------------------------------------------------------- value checks
Check = tuple[str, Callable[[Any], bool]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(minimum: int) -> Check:
    return f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum


def _int_in(minimum: int, maximum: int) -> Check:
    return (f"an integer in {minimum}..{maximum}",
            lambda v: _is_int(v) and minimum <= v <= maximum)


# Upper bounds on sizes: far above any real setting, low enough that a typo (an extra zero or
# three) is a one-line "must be" at check time, not a MemoryError or an allocator traceback
# minutes into a run.
#: Input side in pixels: 4096² × 3 float32 is 200 MB per image already (ImageNet runs use 224).
MAX_IMAGE_SIZE = 4096
#: Backbone base width (channels of its first stage; 16 by default, later stages × 8): 1024
#: gives 8192-channel stages, past any GPU's memory for a batch.
MAX_WIDTH = 1024
#: Feature (embedding) dimension: 65536 floats per sample, and the head's weights are
#: classes × embed_dim (512 in the presets).
MAX_EMBED_DIM = 65536
#: Samples per batch (train and eval; 512 at most in the presets): 65536 is already past what
#: one device holds at 224 px.
MAX_BATCH_SIZE = 65536


#: Training seeds: below 2**32 (numpy's seed range; the engine derives per-epoch torch seeds
#: seed · 100003 + epoch, which must stay below 2**64).
MAX_SEED = 2**32 - 1


def _number(description: str, test: Callable[[float], bool]) -> Check:
    return f"a number {description}", lambda v: _is_number(v) and test(v)


def _choice(*choices: str) -> Check:
    return f"one of {', '.join(choices)}", lambda v: isinstance(v, str) and v in choices


def _or_null(check: Check) -> Check:
    description, test = check
    return f"null or {description}", lambda v: v is None or test(v)


class _Registered:
    """The check of a component's name: one of ``words`` or a name of ``registry``, the names
    read when the check runs (a component registered after import is accepted and listed).
    Unpacks as a check's ``(description, test)`` pair."""

    def __init__(self, registry: Mapping[str, Any], *words: str) -> None:
        self.registry, self.words = registry, words

    def names(self) -> tuple[str, ...]:
        return (*self.words, *self.registry)

    @property
    def description(self) -> str:
        return f"one of {', '.join(self.names())}"

    def test(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.names()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.description, self.test))

    def __getitem__(self, index: int) -> Any:
        return (self.description, self.test)[index]


_BOOL: Check = ("true or false", lambda v: isinstance(v, bool))
_TEXT: Check = ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
_NUMBERS: Check = ("a list of numbers", lambda v: isinstance(v, list) and bool(v)
                   and all(_is_number(x) for x in v))
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

#: What every config value must be, by dotted key (keys of ``configs/base.yaml``).
CHECKS: dict[str, Check | _Registered] = {
    "method": _TEXT,
    "seed": (f"an integer in 0..{MAX_SEED}", lambda v: _is_int(v) and 0 <= v <= MAX_SEED),
    "deterministic": _BOOL,
    "device": ("auto, cpu, mps, cuda or cuda:N",
               lambda v: isinstance(v, str) and _DEVICE.fullmatch(v) is not None),
    "data.image_root": _or_null(_TEXT),
    "data.image_size": _int_in(1, MAX_IMAGE_SIZE),
    "data.channels": ("1 or 3", lambda v: _is_int(v) and v in (1, 3)),
    "data.mean": _NUMBERS,
    "data.std": ("a list of numbers > 0", lambda v: _NUMBERS[1](v) and min(v) > 0),
    "data.transform": _Registered(PRESETS),
    "data.cache_images": _BOOL,
    "data.num_workers": _int(0),
    "data.loader": _choice("auto", "tensor", "files"),
    "data.decode": _choice("cpu", "device"),
    "data.skip_bad_images": _BOOL,
    "data.allow_outside_root": _BOOL,
    "model.backbone": _TEXT,
    "model.width": _or_null(_int_in(1, MAX_WIDTH)),
    "model.pretrained_path": _or_null(_TEXT),
    "model.embed_dim": _or_null(_int_in(1, MAX_EMBED_DIM)),
    "model.dropout": _number("in [0, 1)", lambda v: 0 <= v < 1),
    "model.classifier": _Registered(HEADS),
    "model.margin_scale": _number("> 0", lambda v: v > 0),
    "model.margin": _or_null(_number(">= 0", lambda v: v >= 0)),
    "model.arcface_easy_margin": _BOOL,
    "model.fslwf_novel_max": _int(0),
    "model.cosine_scale": _number("> 0", lambda v: v > 0),
    "model.squash_form": _choice(*SQUASH_FORMS),
    "model.attention": _BOOL,
    "model.modulation": _BOOL,
    "model.meta_embedding": _BOOL,
    "model.use_memory": _BOOL,
    "model.use_selector": _BOOL,
    "model.use_reachability": _BOOL,
    "model.reachability_scale": ("a number > 0 or auto",
                                 lambda v: v == "auto" or (_is_number(v) and v > 0)),
    "model.learn_reachability_scale": _BOOL,
    "model.detach_memory": _BOOL,
    "train.epochs": _int(0),
    "train.batch_size": _int_in(1, MAX_BATCH_SIZE),
    "train.sampler": _Registered(SAMPLERS),
    "train.samples_per_class": _int(1),
    "train.balance_power": _number("in [0, 1]", lambda v: 0 <= v <= 1),
    "train.epoch_samples": _or_null(_int(1)),
    "train.lr": _number("> 0", lambda v: v > 0),
    "train.lr_backbone": _or_null(_number("> 0", lambda v: v > 0)),
    "train.lr_centroids": _or_null(_number("> 0", lambda v: v > 0)),
    "train.momentum": _number("in [0, 1)", lambda v: 0 <= v < 1),
    "train.weight_decay": _number(">= 0", lambda v: v >= 0),
    "train.nesterov": _BOOL,
    "train.schedule": _choice("cosine", "step", "constant"),
    "train.step_size": _int(1),
    "train.gamma": _number("> 0", lambda v: v > 0),
    "train.warmup_epochs": _int(0),
    "train.label_smoothing": _number("in [0, 1)", lambda v: 0 <= v < 1),
    "train.loss": _Registered(CLASSIFICATION_LOSSES),
    "train.focal_gamma": _number(">= 0", lambda v: v >= 0),
    "train.logit_adjust_tau": _number(">= 0", lambda v: v >= 0),
    "train.ldam_max_margin": _number("> 0", lambda v: v > 0),
    "train.ldam_scale": _number("> 0", lambda v: v > 0),
    "train.drw_epoch": _or_null(_int(1)),
    "train.drw_beta": _number("in [0, 1)", lambda v: 0 <= v < 1),
    "train.feature_loss": _Registered(FEATURE_LOSSES, "none"),
    "train.feature_loss_weight": _number(">= 0", lambda v: v >= 0),
    "train.feature_loss_margin": _number(">= 0", lambda v: v >= 0),
    "train.centroid_loss": _Registered(CENTROID_LOSSES, "none"),
    "train.centroid_relative_margin": _BOOL,
    "train.centroid_weight": _number(">= 0", lambda v: v >= 0),
    "train.centroid_margin": _number(">= 0", lambda v: v >= 0),
    "train.centroid_feature": _choice("direct", "meta"),
    "train.freeze_backbone": _BOOL,
    "train.feature_cache": _choice("off", "on"),
    "train.feature_cache_dtype": _choice("float32", "float16"),
    "train.compile": _BOOL,
    "train.init_from": _or_null(_TEXT),
    "train.require_pretrained": _BOOL,
    "train.amp": _choice("auto", "bf16", "off"),
    "train.channels_last": _BOOL,
    "train.sync_batchnorm": _BOOL,
    "train.grad_clip": _or_null(_number("> 0", lambda v: v > 0)),
    "train.max_steps_per_epoch": _or_null(_int(1)),
    "train.log_every": _int(1),
    "train.nonfinite": _choice("stop", "skip"),
    "eval.batch_size": _int_in(1, MAX_BATCH_SIZE),
    "eval.amp": _choice("off", "bf16"),
    "eval.open_score": ("auto or an open-set detector (oltr.detectors)",
                        lambda v: isinstance(v, str) and (v == "auto" or v in DETECTORS)),
    "eval.open_score_options": ("a mapping of the detector's options",
                                lambda v: isinstance(v, dict)),
    "eval.open_score_candidates": ("null or a list of detector names",
                                   lambda v: v is None or (isinstance(v, list) and bool(v) and all(
                                       isinstance(x, str) and x in DETECTORS for x in v))),
    "eval.select": _choice("balanced_accuracy", "f_measure", "auroc"),
    "eval.threshold": _or_null(_number("in [0, 1] (a probability)", lambda v: 0 <= v <= 1)),
    "eval.logit_adjustment": ("a number or auto",
                              lambda v: v == "auto" or (_is_number(v) and math.isfinite(v))),
    "eval.open_score_logits": _choice("model", "decision"),
    "eval.tau_normalization": ("a number >= 0 or auto",
                               lambda v: v == "auto" or (_is_number(v) and v >= 0)),
    "eval.accept_rate": _number("in (0, 1]", lambda v: 0 < v <= 1),
    "eval.many_threshold": _int(0),
    "eval.few_threshold": _int(0),
    "eval.strict_shots": _BOOL,
}
# YAML 1.1 reads the words off/on/yes/no as booleans; a choice that is one of them is meant.
_YAML_BOOLEAN_WORDS = {False: ("off", "no"), True: ("on", "yes")}


def _restore_boolean_words(section: dict[str, Any], prefix: str) -> None:
    """``amp: off`` reads as ``False``; put the word back where the key expects a word."""
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _restore_boolean_words(value, f"{name}.")
        elif isinstance(value, bool) and name in CHECKS:
            words = [w for w in _YAML_BOOLEAN_WORDS[value] if CHECKS[name][1](w)]
            if len(words) == 1:
                section[key] = words[0]


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_flat(config: dict[str, Any], name_of: Callable[[str], str], origins: Origins) -> None:
    def bad(key: str, message: str, value: Any) -> InputError:
        name = name_of(key)
        return InputError(message.replace("{key}", f"config key '{name}'", 1), value=value,
                          **origins.locate(name))

    values = _flatten({k: v for k, v in config.items() if k not in ("stages", "stage")})
    for key, value in values.items():
        if key in CHECKS:
            description, test = CHECKS[key]
            if not test(value):
                hint = ""
                if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
                    hint = " (YAML 1.1 reads 1e-3 as text: write 1.0e-3)"
                raise bad(key, f"{{key}} must be {description}{hint}", value)
    data, train, evaluation = config["data"], config["train"], config["eval"]
    for key in ("mean", "std"):
        if len(data[key]) != data["channels"]:
            raise bad("data." + key, "{key} needs one value per channel "
                      f"(data.channels = {data['channels']})", data[key])
    if train["nesterov"] and train["momentum"] == 0:
        raise bad("train.nesterov", "{key} needs train.momentum > 0", train["momentum"])
    if train["feature_cache"] == "on" and not train["freeze_backbone"]:
        raise bad("train.feature_cache", "{key}: on needs train.freeze_backbone: true (only a "
                  "frozen part can be computed once)", train["feature_cache"])
    if data["decode"] == "device" and data["transform"] != "imagenet":
        raise bad("data.decode", "{key}: device decodes and augments with the imagenet preset "
                  "only (small and none datasets are decoded once into memory, data.loader)",
                  data["transform"])
    if evaluation["few_threshold"] > evaluation["many_threshold"]:
        raise bad("eval.few_threshold", "{key} must be <= eval.many_threshold",
                  evaluation["few_threshold"])
    if evaluation["open_score"] != "auto":  # its options, before hours of training
        try:
            rule_detector(evaluation["open_score"], evaluation["open_score_options"])
        except InputError as exc:
            raise bad("eval.open_score_options", f"{{key}}: {exc}",
                      evaluation["open_score_options"]) from None


def check_config(config: dict[str, Any]) -> None:
    """Check a resolved config built or edited in Python as :func:`load_config` checks one it
    resolves: every key known (in each stage too) and every value valid; InputError naming the
    key and value. `oltr.pipeline.train_run` calls it before it creates anything."""
    reference = read_yaml(BASE_CONFIG)
    check_keys({k: v for k, v in config.items() if k != "stages"}, reference)
    stages = config.get("stages")
    _check_stages(stages, (None, None))  # type: ignore[arg-type]
    for stage in stages:
        check_keys({k: v for k, v in stage.items() if k != "name"}, reference,
                   f"stages[{stage['name']}]")
    present = _flatten({k: v for k, v in config.items() if k != "stages"})
    missing = [key for key in _flatten({k: v for k, v in reference.items() if k != "stages"})
               if key not in present]
    if missing:
        raise InputError(f"config lacks the key '{missing[0]}' (resolve configs with "
                         "oltr.config.load_config, which fills in every default)")
    validate_config(config)


def validate_config(config: dict[str, Any], origins: Origins | None = None) -> None:
    """Check every value of a resolved config (and each stage as it will run); InputError naming
    the key (``stage2.train.lr`` when a stage sets it), the value and, when ``origins`` knows
    it, the file and line that wrote it. YAML words read as booleans (``amp: off``) are turned
    back into the word first."""
    origins = origins or Origins()
    _restore_boolean_words(config, "")
    for stage in config["stages"]:
        _restore_boolean_words(stage, "")
    _check_flat(config, lambda key: key, origins)
    for stage in config["stages"]:
        own = _flatten({k: v for k, v in stage.items() if k != "name"})

        def name_of(key: str, stage_name: str = stage["name"], own: dict = own) -> str:
            return f"{stage_name}.{key}" if key in own else key

        _check_flat(stage_config(config, stage["name"]), name_of, origins)
