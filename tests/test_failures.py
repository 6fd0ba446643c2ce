"""Failures that must stay one line (issue 24 §2): deep JSON, huge sizes, odd file names,
an empty checkpoint, the machine's errors (a full disk, no memory)."""
from __future__ import annotations

import pytest

from oltr.config import load_config
from oltr.errors import InputError
from oltr.io import read_json_object
from oltr.run import read_history

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["manifest.json", "decision.json", "model.json"])
def test_deeply_nested_json_is_one_input_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"a": ' + DEEP + "}")
    with pytest.raises(InputError, match="nested too deeply") as info:
        read_json_object(path, name)
    assert str(path) in str(info.value)


def test_deeply_nested_history_line_is_one_input_error_naming_the_line(tmp_path):
    (tmp_path / "history.jsonl").write_text('{"epoch": 1}\n' + DEEP + "\n")
    with pytest.raises(InputError, match=r"history.jsonl:2: .*nested too deeply"):
        read_history(tmp_path)


@pytest.mark.parametrize(("override", "message"), [
    ("data.image_size=100000", r"'data.image_size' must be an integer in 1..4096"),
    ("model.width=100000", r"'model.width' must be null or an integer in 1..1024"),
    ("model.embed_dim=1000000", r"'model.embed_dim' must be null or an integer in 1..65536"),
    ("train.batch_size=1000000", r"'train.batch_size' must be an integer in 1..65536"),
    ("eval.batch_size=1000000", r"'eval.batch_size' must be an integer in 1..65536"),
])
def test_sizes_in_a_config_are_bounded(override, message):
    with pytest.raises(InputError, match=message) as info:
        load_config("plain", overrides=[override])
    assert override.split("=")[1] in str(info.value)


def test_the_bounds_admit_every_preset_size():
    load_config("plain", overrides=["data.image_size=4096", "model.width=1024",
                                    "model.embed_dim=65536", "train.batch_size=65536"])


def test_display_path_escapes_control_characters_and_undecodable_bytes():
    import os

    from oltr.errors import display_path
    assert display_path("/data/a.png") == "/data/a.png"
    assert display_path("a\nb\tc\x1b[31m.png") == "a\\nb\\tc\\x1b[31m.png"
    assert display_path(os.fsdecode(b"c\xff.png")) == "c\\xff.png" == display_path(b"c\xff.png")
    assert display_path("caf\u00e9\u2028.png") == "caf\u00e9\\u2028.png"
    error = InputError("cannot read image", path="a\nb.png", line=2)
    assert str(error) == "a\\nb.png:2: cannot read image"


def test_an_empty_checkpoint_says_so_and_what_to_do(tmp_path):
    from oltr.train.checkpoint import load_checkpoint
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"checkpoint\.pt: checkpoint\.pt is empty \(0 bytes\): "
                                         r"the run was interrupted while saving it .*rerun "
                                         r"with --resume"):
        load_checkpoint(path)
