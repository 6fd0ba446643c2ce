"""Split files: round trip, tolerated layout, and every malformed input named by file and line."""
from __future__ import annotations

import hashlib

import pytest

from oltr.data.splits import (
    read_split_file,
    read_split_lines,
    sha256_file,
    write_split_file,
)
from oltr.errors import InputError


def test_round_trip_keeps_paths_with_spaces_and_open_label(tmp_path):
    entries = [("n01/a.JPEG", 0), ("dir with space/b c.png", 2), ("open/x.jpg", -1)]
    path = tmp_path / "train.txt"
    write_split_file(path, entries)
    assert path.read_bytes() == b"n01/a.JPEG 0\ndir with space/b c.png 2\nopen/x.jpg -1\n"
    assert read_split_file(path) == entries


def test_blank_lines_crlf_and_missing_final_newline_are_tolerated(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"\n a.png 1\r\n\n  \nb.png   0")
    entries, lines = read_split_lines(path)
    assert entries == [("a.png", 1), ("b.png", 0)]
    assert lines == [2, 5]


@pytest.mark.parametrize(
    ("text", "kwargs", "line", "value", "what"),
    [
        ("a.png 0\nonlypath\n", {}, 2, "onlypath", "expected 'path label'"),
        ("a.png zero\n", {}, 1, "zero", "not an integer"),
        ("a.png 1.5\n", {}, 1, "1.5", "not an integer"),
        ("a.png 1_0\n", {}, 1, "1_0", "not an integer"),
        ("a.png 0\nb.png -2\n", {}, 2, "-2", "below -1"),
        ("a.png 0\n\nb.png 3\n", {"num_classes": 3}, 3, "3", "out of range"),
        ("a.png -1\n", {"allow_open": False}, 1, "-1", "not allowed"),
        ("a.png 0\nb.png 1\na.png 1\n", {}, 3, "a.png", "listed twice (first on line 1)"),
    ],
)
def test_malformed_lines_name_file_line_and_value(tmp_path, text, kwargs, line, value, what):
    path = tmp_path / "bad_split.txt"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        read_split_file(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    assert what in message
    assert repr(value) in message
    assert info.value.line == line


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="empty.txt: split file is empty"):
        read_split_file(empty)
    with pytest.raises(InputError, match="missing.txt: split file not found"):
        read_split_file(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe 1\n")
    with pytest.raises(InputError, match="binary.txt: split file is not UTF-8"):
        read_split_file(binary)


def test_write_is_atomic_and_validates_before_touching_the_file(tmp_path):
    path = tmp_path / "val.txt"
    write_split_file(path, [("a.png", 0)])
    with pytest.raises(InputError, match="line break"):
        write_split_file(path, [("b.png", 1), ("c\n.png", 0)])
    with pytest.raises(InputError, match="label must be an integer >= -1"):
        write_split_file(path, [("b.png", -3)])
    assert path.read_text() == "a.png 0\n"
    write_split_file(path, [("b.png", 1)])
    assert path.read_text() == "b.png 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.txt"]


def test_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
