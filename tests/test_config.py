"""Config resolution: presets, base inheritance, overrides per stage, unknown keys."""
from __future__ import annotations

import pytest

from oltr.config import list_methods, load_config, parse_override, stage_config
from oltr.errors import InputError


def test_parse_override_types() -> None:
    assert parse_override("train.lr=0.05") == {"train": {"lr": 0.05}}
    assert parse_override("model.attention=true") == {"model": {"attention": True}}
    assert parse_override("data.mean=[0.5]") == {"data": {"mean": [0.5]}}
    assert parse_override("train.lr=1e-3") == {"train": {"lr": 0.001}}  # YAML 1.1 says str
    with pytest.raises(InputError, match="section.key=value"):
        parse_override("train.lr")


def test_plain_preset_resolves_base_and_benchmark() -> None:
    config = load_config("plain")
    assert config["method"] == "plain"
    assert [s["name"] for s in config["stages"]] == ["main"]
    flat = stage_config(config, "main")
    assert flat["model"]["backbone"] == "resnet10_small"  # fmnist_lt/_base.yaml
    assert flat["train"]["epochs"] == 30  # plain.yaml: equal to OLTR's 22 + 8
    assert flat["train"]["momentum"] == 0.9  # base.yaml


def test_oltr_stages_and_stage_overrides() -> None:
    config = load_config("oltr", overrides=["train.batch_size=64", "stage2.train.epochs=3"])
    stage1, stage2 = stage_config(config, "stage1"), stage_config(config, "stage2")
    assert stage1["model"]["classifier"] == "linear" and stage1["train"]["sampler"] == "instance"
    assert stage2["model"]["classifier"] == "cosine" and stage2["model"]["meta_embedding"]
    assert stage2["train"]["sampler"] == "class_aware"
    assert stage2["train"]["epochs"] == 3 and stage1["train"]["epochs"] == 22
    assert stage1["train"]["batch_size"] == stage2["train"]["batch_size"] == 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=0.1"], "unknown config key 'train.lrr'"),
        (["stage2.model.atention=true"], "unknown config key 'stage2.model.atention'"),
        (["model=3"], "must be a mapping"),
    ],
)
def test_unknown_keys_are_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_config("oltr", overrides=overrides)


def test_unknown_method_lists_available() -> None:
    with pytest.raises(InputError, match="available: .*oltr.*plain"):
        load_config("nope")
    assert {"plain", "oltr"} <= set(list_methods())


def test_config_file_with_bad_yaml_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(InputError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(config_file=path)


def test_every_base_key_has_a_value_check() -> None:
    import yaml

    from oltr.config import BASE_CONFIG, CHECKS

    def keys(section: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in section.items():
            if isinstance(value, dict) and value:  # an empty mapping is a key's value
                out += keys(value, f"{prefix}{key}.")
            elif key != "stages":
                out.append(prefix + key)
        return out

    assert sorted(keys(yaml.safe_load(BASE_CONFIG.read_text()))) == sorted(CHECKS)


def test_a_plain_override_a_stage_sets_itself_is_named_not_silently_dropped():
    """train.epochs=1 on a preset whose stages set their own epochs leaves them (the stage's
    value wins) and warns, naming each stage and the stage-prefixed form to use."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config("oltr", overrides=["train.epochs=1", "stage2.train.epochs=3",
                                                "model.width=8"])
    assert [stage["train"]["epochs"] for stage in config["stages"]] == [22, 3]
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "stage 'stage1'" in messages[0]
    assert "stage1.train.epochs=" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("plain", overrides=["train.epochs=1"])  # one stage: it applies, no warning
