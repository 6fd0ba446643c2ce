"""The one text reader (oltr.io.read_text) and the files read through it: a byte-order mark is
never part of a class name, any line ends work, non-UTF-8 is named (issue 9)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from PIL import Image

from oltr.cli import main
from oltr.config import load_config
from oltr.data import load_benchmark, parse_source
from oltr.data.splits import read_split_lines
from oltr.errors import InputError
from oltr.io import read_json_object, read_text
from oltr.run import read_history as _read_history

BOM = "\ufeff"


def test_read_text_drops_a_bom_and_normalises_line_ends(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes((BOM + "a\r\nb\rc\nd").encode("utf-8"))
    assert read_text(path, "file") == "a\nb\nc\nd"
    path.write_bytes(b"no bom\n")
    assert read_text(path, "file") == "no bom\n"


def test_read_text_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"none\.txt: class-name file not found"):
        read_text(tmp_path / "none.txt", "class-name file")
    with pytest.raises(InputError, match=r"split file is not a regular file \(a folder\)$"):
        read_text(tmp_path, "split file")
    (tmp_path / "latin.txt").write_bytes("a 0\ncafé 1\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.txt: split file is not UTF-8 text \(invalid "
                                         r"continuation byte at line 2, byte 7\)"):
        read_text(tmp_path / "latin.txt", "split file")
    (tmp_path / "wide.txt").write_text("a 0\n", encoding="utf-16")
    with pytest.raises(InputError, match=r"wide\.txt: split file is not UTF-8 text \(it starts "
                                         r"with a UTF-16 byte-order mark; save it as UTF-8\)"):
        read_text(tmp_path / "wide.txt", "split file")


def windows_text(path: Path, text: str) -> Path:
    """``text`` as a Windows editor saves it: UTF-8 with a byte-order mark, CRLF line ends."""
    path.write_bytes((BOM + text.replace("\n", "\r\n")).encode("utf-8"))
    return path


def splits_source(root: Path) -> Path:
    for label, name in enumerate(("cat", "dog", "owl")):
        for i in range(6):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), 40 * label + i).save(path)
    windows_text(root / "classes.txt", "cat\ndog\nowl\n")
    windows_text(root / "train.txt", "".join(f"{name}/{i}.png {label}\n"
                                             for label, name in enumerate(("cat", "dog", "owl"))
                                             for i in range(6)))
    return root


def test_a_bom_in_classes_txt_is_not_part_of_the_first_class_name(tmp_path, capsys):
    source = splits_source(tmp_path / "src")
    assert parse_source(f"splits:{source}").class_names == ["cat", "dog", "owl"]
    out = tmp_path / "bench"
    assert main(["curate", f"splits:{source}", "--out", str(out), "--known", "cat,dog",
                 "--max-count", "3", "--min-count", "2", "--val-per-class", "1",
                 "--test-per-class", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert sorted(manifest["known_classes"]) == ["cat", "dog"]
    assert manifest["open_classes"] == ["owl"]
    assert BOM not in (out / "classes.txt").read_text(encoding="utf-8")
    capsys.readouterr()
    windows_text(out / "classes.txt", (out / "classes.txt").read_text())
    assert load_benchmark(out, verify=False).class_names == manifest["known_classes"]


def test_split_files_configs_json_and_histories_with_bom_and_crlf(tmp_path):
    split = windows_text(tmp_path / "train.txt", "a.png 0\n\nb.png 1\n")
    assert read_split_lines(split) == ([("a.png", 0), ("b.png", 1)], [1, 3])
    config = windows_text(tmp_path / "mine.yaml", "train:\n  lr: 0.05\n")
    assert load_config(config_file=config)["train"]["lr"] == 0.05
    data = windows_text(tmp_path / "x.json", '{\n  "a": 1\n}\n')
    assert read_json_object(data, "thing") == {"a": 1}
    windows_text(tmp_path / "history.jsonl", '{"epoch": 1}\n{"epoch": 2}\n')
    assert _read_history(tmp_path) == [{"epoch": 1}, {"epoch": 2}]


def test_atomic_writes_get_the_mode_of_a_new_file_whatever_the_writer_gave(tmp_path):
    """safetensors creates 0600 files; weights and decision rules then had another mode than
    every other file of a run. An atomic write gives 0666 less the umask."""
    import os
    import stat

    from oltr.io import atomic_write

    def private(path):
        path.write_bytes(b"x")
        os.chmod(path, 0o600)

    atomic_write(tmp_path / "w.safetensors", private)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~mask


def test_oltr_version(capsys):
    from oltr import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"oltr {__version__}"


@pytest.mark.parametrize(("number", "text"), [
    (errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
    (errno.EACCES, "Permission denied")])
def test_the_machines_errors_are_one_line_naming_the_path_exit_1(tmp_path, capsys, monkeypatch,
                                                                  number, text):
    """A full disk, a read-only mount, a permission while writing: exit status 1 and one line
    naming the user's path and the reason (issue 24 §2); --debug still shows the traceback."""
    import oltr.data.curation

    def full(*_args, **_kwargs):
        raise OSError(number, text, "/x/y")

    monkeypatch.setattr(oltr.data.curation, "atomic_write_bytes", full)
    source = splits_source(tmp_path / "src")
    argv = ["curate", f"splits:{source}", "--out", str(tmp_path / "bench"), "--known",
            "cat,dog", "--max-count", "3", "--min-count", "2", "--val-per-class", "1",
            "--test-per-class", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"oltr curate: error: /x/y: {text} ({errno.errorcode[number]})\n"
    with pytest.raises(OSError, match=text):
        main(["--debug", *argv])


def test_memory_error_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import oltr.data.curation

    def exhausted(*_args, **_kwargs):
        raise MemoryError

    monkeypatch.setattr(oltr.data.curation, "atomic_write_bytes", exhausted)
    source = splits_source(tmp_path / "src")
    assert main(["curate", f"splits:{source}", "--out", str(tmp_path / "bench"), "--known",
                 "cat,dog", "--max-count", "3", "--min-count", "2", "--val-per-class", "1",
                 "--test-per-class", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("oltr curate: error: out of memory: lower ") and err.count("\n") == 1
