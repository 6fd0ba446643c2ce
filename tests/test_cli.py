"""The command line: help, the user's commands end to end, and one-line errors for bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from oltr.cli import build_parser, main


def test_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("curate", "train", "evaluate", "predict"):
        assert command in out
    for command in ("curate", "train", "evaluate", "predict"):
        parser = build_parser()
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])


def _tree(root: Path, counts: list[int]) -> Path:
    for index, count in enumerate(counts):
        folder = root / f"class{index:02d}"
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), (index * 20 + i) % 256).save(folder / f"{i:03d}.png")
    return root


def test_curate_folder_imagenet_lt_profile(tmp_path, capsys) -> None:
    """ImageNet-LT's parameters (Pareto α = 6) scaled down to a generated folder tree."""
    source = _tree(tmp_path / "tree", [80] * 10)
    args = ["curate", f"folder:{source}", "--known", "8", "--profile", "pareto", "--alpha", "6",
            "--max-count", "60", "--min-count", "5", "--val-per-class", "4",
            "--test-per-class", "6", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    # n_r = 60 · x_r^-7 on an even grid of x ∈ [1, 12^(1/7)], rounded (hand-computed).
    assert manifest["counts"]["train"] == [60, 40, 27, 19, 13, 9, 7, 5]
    for name in ("train.txt", "val.txt", "test.txt", "open.txt", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "8 known classes" in capsys.readouterr().out


def test_curate_without_known_or_open_says_there_are_no_open_classes(tmp_path, capsys) -> None:
    source = _tree(tmp_path / "tree", [12] * 3)
    args = ["curate", f"folder:{source}", "--max-count", "5", "--min-count", "2",
            "--val-per-class", "1", "--test-per-class", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "0 open classes" in captured.out
    assert captured.err == (
        "oltr curate: note: neither --known/--open nor --protocol given: every class of the "
        "source is known and none is open, so the benchmark has no open split (pass --known N "
        "or --open N to hold classes out as open)\n")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["open_classes"] == []
    assert main([*args, "--known", "2", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["curate", "--help"])
    assert "none is open (no open split" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda p: None, ["curate", "folder:{p}/missing", "--out", "{p}/out"], "missing"),
        (lambda p: (p / "tree" / "empty").mkdir(parents=True) or _tree(p / "tree2", [3]),
         ["curate", "folder:{p}/tree", "--out", "{p}/out"], "empty"),
        (lambda p: (p / "bad.txt").write_text("a.png 0\nb.png\n"),
         ["curate", "splits:{p}/bad.txt", "--out", "{p}/out"], "bad.txt:2"),
        (lambda p: (p / "lab.txt").write_text("a.png 0\nb.png 7\n"),
         ["curate", "splits:{p}/lab.txt", "--out", "{p}/out"], "lab.txt"),
        (lambda p: None, ["train", "--method", "nope", "--data", "{p}", "--out", "{p}/r"],
         "unknown method 'nope'"),
        (lambda p: None, ["train", "--method", "plain", "--data", "{p}/nodata", "--out", "{p}/r",
                          "train.epochs=1"], "nodata"),
        (lambda p: None, ["train", "--method", "plain", "--data", "{p}", "--out", "{p}/r",
                          "train.nope=1"], "unknown config key 'train.nope'"),
        (lambda p: None, ["evaluate", "{p}/norun", "--data", "{p}"], "norun"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make, args, message) -> None:
    make(tmp_path)
    code = main([a.replace("{p}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no partial output


def test_train_evaluate_predict_commands(fmnist_small, tiny, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", "plain", "--data", str(fmnist_small), "--out", str(run),
                 "--no-progress", *tiny, "train.epochs=1"]) == 0
    assert main(["evaluate", str(run), "--data", str(fmnist_small), "--open",
                 "--open-score", "msp", "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "closed" in out and "open" in out and "probability 0.5" in out
    report = json.loads((run / "report.json").read_text())
    assert report["open"]["threshold"] == pytest.approx(0.5)
    # the benchmark's files without its images (moved elsewhere): --image-root finds them
    moved = tmp_path / "moved"
    moved.mkdir()
    for item in fmnist_small.iterdir():
        if item.is_file() and item.suffix in (".txt", ".json"):
            shutil.copy(item, moved / item.name)
    args = ["evaluate", str(run), "--data", str(moved), "--open", "--open-score", "msp",
            "--threshold", "0.5", "--output", str(tmp_path / "moved.json")]
    assert main(args) == 2
    assert "images" in capsys.readouterr().err  # names the missing image
    assert main([*args, "--image-root", str(fmnist_small / "images")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "moved.json").read_text())["closed"] == report["closed"]
    image = next((fmnist_small / "images").rglob("*.png"))
    assert main(["predict", str(run), str(image), "--format", "jsonl"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["path"] == str(image)
    # --resume of a finished run trains nothing more and succeeds.
    assert main(["train", "--method", "plain", "--data", str(fmnist_small), "--out", str(run),
                 "--no-progress", "--resume", *tiny, "train.epochs=1"]) == 0


def test_help_shows_only_real_defaults(capsys) -> None:
    """`--help` never prints "(default: None)" nor repeats a default the text already gives."""
    for command in ("curate", "train", "evaluate", "predict", "bench", "analyze"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        if command == "bench":
            assert "comma-separated training seeds (default: 0,1,2)" in text
        if command == "evaluate":
            assert "report path (default RUN/report.json) --skip" in text


def test_train_image_root_is_saved_absolute_and_moved_images_are_found_again(
        fmnist_small, tiny, tmp_path, capsys, monkeypatch) -> None:
    """`oltr train --image-root DIR` (or a relative data.image_root) is saved as an absolute
    path, so the run evaluates from any working directory; overrides may follow options; a
    run whose images moved says where its root came from, and `evaluate` / `report` take
    --image-root."""
    import yaml

    files = tmp_path / "lists"
    files.mkdir()
    for item in fmnist_small.iterdir():
        if item.is_file() and item.suffix in (".txt", ".json"):
            shutil.copy(item, files / item.name)
    images = tmp_path / "work" / "imgs"
    shutil.copytree(fmnist_small / "images", images)
    monkeypatch.chdir(tmp_path / "work")
    run = tmp_path / "run"
    assert main(["train", "--method", "plain", *tiny[:2], "--data", str(files), "--out", str(run),
                 "--image-root", "imgs", "--no-progress", *tiny[2:], "train.epochs=1"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["image_root"] == str(images)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(run), "--data", str(files)]) == 0
    capsys.readouterr()
    images.rename(tmp_path / "elsewhere")
    assert main(["evaluate", str(run), "--data", str(files)]) == 2
    assert "the run's data.image_root" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--data", str(files), "--image-root",
                 str(tmp_path / "elsewhere")]) == 0
    assert main(["report", str(run), "--data", str(files), "--out", str(tmp_path / "page"),
                 "--image-root", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "page" / "index.html").is_file()
    capsys.readouterr()
    # another train list: evaluation warns (one line) that shot groups come from this one
    other = tmp_path / "other"
    other.mkdir()
    for item in files.iterdir():
        if item.name != "manifest.json":
            shutil.copy(item, other / item.name)
    lines = (other / "train.txt").read_text().splitlines()
    (other / "train.txt").write_text("\n".join(lines[:-1]) + "\n")
    assert main(["evaluate", str(run), "--data", str(other), "--image-root",
                 str(tmp_path / "elsewhere"), "--output", str(tmp_path / "other.json")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("oltr evaluate: warning: ") and "its train split is not the one the " \
        "model trained on" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exited:  # argparse's way, as for any unknown option
        main(["train", "--method", "plain", "--data", str(files), "--out", str(tmp_path / "x"),
              "--bogus", "train.epochs=1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "train.epochs=1" not in err


def test_published_lists_with_another_preset_family_are_pointed_out(tmp_path) -> None:
    from oltr.cli.train import benchmark_mismatch as _benchmark_mismatch

    (tmp_path / "ImageNet_LT_train.txt").write_text("train/n1/a.JPEG 0\n")
    assert "use --benchmark imagenet_lt" in _benchmark_mismatch(str(tmp_path), "fmnist_lt")
    assert _benchmark_mismatch(str(tmp_path), "imagenet_lt") is None
    assert _benchmark_mismatch(str(tmp_path / "absent"), "fmnist_lt") is None


def test_command_defaults_are_the_library_functions_defaults(capsys) -> None:
    """A command's defaults are read from the function it calls, and --help shows them; oltr
    curate's head/tail counts (ImageNet-LT's 1280 → 5) are constants of oltr.data.curation,
    since curate() itself requires them for a fixed-count profile."""
    import inspect

    from oltr.cli.curate import SETTINGS, curation_defaults
    from oltr.data.curation import DEFAULT_MAX_COUNT, DEFAULT_MIN_COUNT, curate
    from oltr.evaluation.analysis import analyze
    from oltr.evaluation.identify_run import identify_run
    from oltr.predict import Predictor

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    defaults = curation_defaults()
    assert (defaults["max_count"], defaults["min_count"]) == (1280, 5)
    assert (DEFAULT_MAX_COUNT, DEFAULT_MIN_COUNT) == (1280, 5)
    assert default(curate, "max_count") is None and default(curate, "min_count") is None
    assert all(defaults[key] == default(curate, key) for key in SETTINGS
               if key not in ("max_count", "min_count"))
    parser = build_parser()
    predict = parser.parse_args(["predict", "run", "a.png"])
    assert (predict.top_k, predict.batch_size) == (default(Predictor.predict, "top_k"),
                                                   default(Predictor.predict, "batch_size"))
    analysis = parser.parse_args(["analyze", "--runs", "a=b", "--out", "o"])
    assert analysis.plots == ",".join(default(analyze, "plots"))
    assert analysis.max_subsets == default(analyze, "max_subsets")
    identify = parser.parse_args(["identify", "run", "--probes", "p"])
    assert (identify.gallery_mode, identify.ties, identify.threshold) == tuple(
        default(identify_run, name) for name in ("gallery_mode", "ties", "threshold"))
    with pytest.raises(SystemExit):
        parser.parse_args(["curate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 1280)" in shown and "(default: 5; none with --ratio)" in shown
