"""Config resolution: presets, base inheritance, overrides per stage, unknown keys."""
from __future__ import annotations

from pathlib import Path

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


def test_an_override_of_an_unknown_stage_lists_the_methods_stages() -> None:
    with pytest.raises(InputError, match=r"unknown config key 'stage1' in an override: neither a "
                                         r"section \(method, seed, .*\) nor a stage of this "
                                         r"method \(main\)"):
        load_config("plain", overrides=["stage1.train.epochs=1"])


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


def test_a_bad_value_in_a_config_file_names_the_file_and_line(tmp_path) -> None:
    """A value error names the file and line that wrote the key: the user's file, a stage of
    it, the ``base:`` file under it; an override of the key takes the blame away from the
    file (the message shows the override's value), and package defaults name no file."""
    base = tmp_path / "mine_base.yaml"
    base.write_text("base: " + str(Path(__file__).resolve().parents[1] / "src/oltr/configs"
                                        / "fmnist_lt/oltr.yaml") + "\n"
                    "eval:\n  many_threshold: 100\n  few_threshold: 200\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: mine_base.yaml\n"
                    "train:\n"
                    "  lr: -1.0\n")
    with pytest.raises(InputError, match=r"mine\.yaml:3: config key 'train\.lr' must be"):
        load_config(config_file=mine)
    with pytest.raises(InputError, match=r"mine_base\.yaml:4: config key 'eval\.few_threshold'"):
        load_config(config_file=mine, overrides=["train.lr=0.1", "stage2.train.lr=0.1"])
    with pytest.raises(InputError) as caught:
        load_config(config_file=mine, overrides=["train.lr=-2.0", "stage2.train.lr=0.1",
                                                 "eval.few_threshold=20"])
    assert str(caught.value).startswith("config key 'train.lr'") and "-2.0" in str(caught.value)

    staged = tmp_path / "staged.yaml"
    staged.write_text("stages:\n"
                      "  - name: stage1\n"
                      "  - name: stage2\n"
                      "    train:\n"
                      "      lr: 0.1\n"
                      "      epochs: -3\n")
    with pytest.raises(InputError, match=r"staged\.yaml:6: config key 'stage2\.train\.epochs'"):
        load_config(config_file=staged)
    staged.write_text(staged.read_text().replace("epochs: -3", "epochs: 3") + "    modle: {}\n")
    with pytest.raises(InputError,
                       match=r"staged\.yaml:7: unknown config key 'stages\[stage2\]\.modle'"):
        load_config(config_file=staged)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("# mine\ntrain:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(InputError, match=r"unknown\.yaml:4: unknown config key 'train\.lrr'"):
        load_config(config_file=unknown)


def test_api_ergonomics_of_load_config() -> None:
    assert load_config("plain", overrides="seed=3")["seed"] == 3  # one override as a string
    with pytest.raises(InputError, match=r"a method preset \(--method NAME; method=\) or a "
                                         r"config file"):
        load_config()


def _train_keys() -> str:
    from oltr.config import BASE_CONFIG, read_yaml

    return ", ".join(sorted(read_yaml(BASE_CONFIG)["train"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # the same name in another section, the stage's prefix kept
        ("stage1.epochs=2",
         ("unknown config key 'stage1.epochs' (valid keys here: data, deterministic, device, "
         "eval, method, model, seed, stages, train); did you mean 'stage1.train.epochs'?")),
        # a typo: difflib on the dotted key, closest first
        ("train.epoch=2",
         (f"unknown config key 'train.epoch' (valid keys here: {_train_keys()}); did you mean "
         "'train.epochs' or 'train.drw_epoch'?")),
        # a bare key: the section that has it
        ("lr=0.1",
         ("unknown config key 'lr' in an override: neither a section (method, seed, "
         "deterministic, device, data, model, train, eval) nor a stage of this method "
         "(stage1, stage2); did you mean 'train.lr'? (value: 'lr=0.1')")),
        # nothing close: no suggestion, the message as before
        ("train.zzzqqq=1",
         f"unknown config key 'train.zzzqqq' (valid keys here: {_train_keys()})"),
        ("nope=1",
         ("unknown config key 'nope' in an override: neither a section (method, seed, "
         "deterministic, device, data, model, train, eval) nor a stage of this method "
         "(stage1, stage2) (value: 'nope=1')")),
    ],
)
def test_an_unknown_key_suggests_the_nearest_valid_key(override: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        load_config("oltr", overrides=[override])
    assert str(caught.value) == message


def test_an_unknown_key_in_a_config_file_suggests_the_nearest_valid_key(tmp_path) -> None:
    """The file and line come first as before; a stage of the file keeps its ``stages[…]``."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("# mine\ntrain:\n  lr: 0.1\n  epoch: 2\n")
    with pytest.raises(InputError) as caught:
        load_config(config_file=mine)
    assert str(caught.value) == (f"{mine}:4: unknown config key 'train.epoch' (valid keys "
                                 f"here: {_train_keys()}); did you mean 'train.epochs' or "
                                 "'train.drw_epoch'?")
    mine.write_text("stages:\n  - name: stage1\n    epochs: 3\n")
    with pytest.raises(InputError) as caught:
        load_config(config_file=mine)
    assert str(caught.value) == (
        f"{mine}:3: unknown config key 'stages[stage1].epochs' (valid keys here: data, "
        "deterministic, device, eval, method, model, seed, stages, train); did you mean "
        "'stages[stage1].train.epochs'?")
