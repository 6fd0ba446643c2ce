"""`oltr predict` / `Predictor` on a run trained without any test split (issue 12): a folder of
PNG and JPEG files, grayscale and RGB, odd sizes, an open-class image and a text file named
.png; labels or "unknown", the bad file reported by name, three output formats."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oltr.cli import main
from oltr.config import load_config
from oltr.errors import InputError
from oltr.pipeline import train_run
from oltr.predict import Predictor


@pytest.fixture(scope="module")
def trained(fmnist_small, tmp_path_factory) -> tuple[Path, Path]:
    """A plain model trained on train + val only (no test, no open split) and a folder of new
    images."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "no-test"
    data.mkdir()
    for name in ("train.txt", "val.txt", "classes.txt"):
        shutil.copy(fmnist_small / name, data / name)
    overrides = ["model.width=8", "train.batch_size=32", "train.max_steps_per_epoch=3",
                 "eval.batch_size=256", "train.epochs=1", "eval.open_score=energy",
                 f"data.image_root={fmnist_small / 'images'}"]
    run = root / "run"
    train_run(load_config("plain", overrides=overrides), data, run, progress=False)
    assert (run / "decision.json").is_file()  # the rule needs no test split
    images = root / "new"
    (images / "sub").mkdir(parents=True)
    known = [fmnist_small / "images" / line.split()[0]
             for line in (fmnist_small / "test.txt").read_text().splitlines()[:3]]
    opened = fmnist_small / "images" / (fmnist_small / "open.txt").read_text().split()[0]
    shutil.copy(known[0], images / "a.png")  # grayscale PNG
    Image.open(known[1]).convert("RGB").save(images / "sub" / "b.jpg", quality=95)  # RGB JPEG
    Image.open(known[2]).resize((37, 23)).save(images / "odd.png")  # an odd size
    shutil.copy(opened, images / "open.png")  # an image of a class never seen
    (images / "notes.png").write_text("not an image")  # a text file named .png
    return run, images


def test_predictor_answers_every_readable_image_and_names_the_bad_one(trained):
    run, images = trained
    predictor = Predictor.from_run(run, device="cpu")
    rows = predictor.predict_paths(sorted(images.rglob("*.*")), top_k=2)
    by_name = {Path(row["path"]).name: row for row in rows}
    assert set(by_name) == {"a.png", "b.jpg", "odd.png", "open.png", "notes.png"}
    assert "notes.png" in by_name["notes.png"]["error"] and "cannot read image" in \
        by_name["notes.png"]["error"]
    names = set(predictor.info["class_names"]) | {"unknown"}
    for name in ("a.png", "b.jpg", "odd.png", "open.png"):
        row = by_name[name]
        assert row["error"] is None and row["label_name"] in names
        assert (row["label_name"] == "unknown") == (row["open_score"] > row["threshold"])
        assert 0.0 <= row["confidence"] <= 1.0 and len(row["top_k"]) == 2
    # the threshold decides "unknown": between two images' scores, the higher one is unknown
    low, high = sorted((by_name[n] for n in ("a.png", "open.png")), key=lambda r: r["open_score"])
    if high["open_score"] > low["open_score"]:
        middle = (low["open_score"] + high["open_score"]) / 2
        again = Predictor.from_run(run, device="cpu", threshold=middle).predict_paths(
            [low["path"], high["path"]])
        assert again[0]["label_name"] != "unknown" and again[1]["label_name"] == "unknown"
    # PIL images and tensors, converted as training did
    image = Image.open(images / "a.png")
    as_pil, as_tensor = predictor.predict([image, torch.from_numpy(np.array(image))])
    assert as_pil.open_score == pytest.approx(by_name["a.png"]["open_score"], rel=1e-6)
    assert as_tensor.open_score == pytest.approx(as_pil.open_score, rel=1e-6)


@pytest.mark.parametrize("form", ["table", "jsonl", "csv"])
def test_predict_command_formats_and_exit_status(trained, capsys, form):
    run, images = trained
    code = main(["predict", str(run), str(images), "--format", form, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1  # a file could not be read; the others were answered
    assert captured.err.strip().splitlines() == [
        f"oltr predict: skipped: {images / 'notes.png'}: cannot read image "
        + captured.err.split("cannot read image ", 1)[1].strip()]
    if form == "jsonl":
        rows = [json.loads(line) for line in captured.out.splitlines()]
    elif form == "csv":
        rows = list(csv.DictReader(io.StringIO(captured.out)))
    else:
        lines = captured.out.splitlines()
        assert lines[0].split()[:3] == ["image", "answer", "confidence"]
        rows = [{"path": line.split()[0]} for line in lines[1:]]
    answered = {Path(row["path"]).name for row in rows if not row.get("error")}
    assert answered == {"a.png", "b.jpg", "odd.png", "open.png"}
    assert main(["predict", str(run), str(images / "a.png"), "--format", form]) == 0


def test_threshold_means_what_it_means_in_evaluate(trained, capsys):
    """--threshold is the msp probability of `oltr evaluate` (refused for another open score,
    never silently read in other units); --open-threshold is in the open score's units."""
    run, images = trained
    assert main(["predict", str(run), str(images / "a.png"), "--threshold", "0.1"]) == 2
    assert "msp open score only" in capsys.readouterr().err
    assert main(["predict", str(run), str(images / "a.png"), "--format", "jsonl",
                 "--open-threshold", "1e30"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["threshold"] == 1e30 and row["label"] != -1
    assert main(["predict", str(run), str(images / "a.png"), "--threshold", "0.1",
                 "--open-threshold", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    predictor = Predictor.from_run(run, device="cpu")
    predictor.rule.open_score = "msp"
    predictor.use_msp_probability(0.1)
    assert predictor.threshold == pytest.approx(0.9)  # msp = 1 − max p: below 0.1 → unknown
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        predictor.use_msp_probability(1.5)


def test_predictor_takes_one_input_alone_and_checks_a_preprocessed_batch(trained):
    """A single path / PIL image / (C, H, W) tensor is one image (not a sequence of its
    characters or channels); a (B, C, H, W) batch must fit the model; names must match."""
    run, images = trained
    predictor = Predictor.from_run(run, device="cpu", threshold=np.float32(0.5))
    image = Image.open(images / "a.png")
    (by_path,) = predictor.predict(str(images / "a.png"))
    (by_pathlib,) = predictor.predict(images / "a.png")
    (by_pil,) = predictor.predict(image)
    tensor = torch.from_numpy(np.array(image)).unsqueeze(0)  # (1, H, W) uint8
    (by_tensor,) = predictor.predict(tensor)
    assert by_path.error is None and by_path.source == str(images / "a.png")
    assert by_path.label == by_pathlib.label == by_pil.label == by_tensor.label
    batch = torch.stack([predictor.preprocess(image)] * 3)
    rows = predictor.predict(batch.double(), batch_size=2)
    assert [row.label for row in rows] == [by_pil.label] * 3
    assert predictor.predict(batch[:0]) == []
    for bad, message in ((batch[:, :, :20], r"must be \(B, 1, 28, 28\)"),
                         (batch.expand(-1, 3, -1, -1), r"must be \(B, 1, 28, 28\)"),
                         ((batch * 255).to(torch.uint8), "must be float")):
        with pytest.raises(InputError, match=message):
            predictor.predict(bad)
    with pytest.raises(InputError, match=r"names: one per input \(3\), got 1"):
        predictor.predict(batch, names=["x"])
    with pytest.raises(InputError, match=r"a stage folder of the run"):
        Predictor.from_artifact(run / "main", device="cpu")


def test_a_closed_set_rule_predicts_without_rejecting(trained):
    from oltr.decision import DecisionRule

    run, images = trained
    predictor = Predictor.from_run(run, device="cpu")
    rule = DecisionRule(class_names=predictor.rule.class_names,
                        train_counts=predictor.rule.train_counts)
    closed = Predictor(predictor.net, predictor.info, rule, device=torch.device("cpu"))
    rows = closed.predict([images / "a.png", images / "odd.png"])
    assert all(row.error is None and row.label >= 0 and 0 <= row.open_score <= 1 for row in rows)
    with pytest.raises(InputError, match=r"logits must be \(N, 4\)"):
        rule.apply(torch.zeros(2, 3), torch.zeros(2, 5))


def test_numpy_images_as_a_practitioner_has_them(trained):
    """NumPy arrays in image layout ((H, W), (H, W, 3); uint8 or float in [0, 1]) are read as
    the same image in PIL or tensor form; other shapes and dtypes are refused by name."""
    run, images = trained
    predictor = Predictor.from_run(run, device="cpu")
    image = Image.open(images / "a.png")
    grey = np.array(image)
    rgb = np.array(image.convert("RGB"))
    expected = predictor.preprocess(image)
    for array in (grey, rgb, grey.astype(np.float64) / 255, rgb[:, :, :1]):
        assert torch.allclose(predictor.preprocess(array), expected, atol=1e-6)
    (one,) = predictor.predict(rgb)
    (pil,) = predictor.predict(image)
    assert one.label == pil.label and one.error is None
    rows = predictor.predict([grey, np.zeros((5, 5, 4), np.uint8), grey.astype(np.int32)])
    assert rows[0].error is None
    assert "(H, W) or (H, W, C)" in rows[1].error and "uint8 (0–255) or float" in rows[2].error


def test_odd_file_names_are_one_row_each_in_any_locale(trained, tmp_path):
    """A newline in a name cannot fake a row; an undecodable byte with an ASCII locale is no
    UnicodeEncodeError (issue 24 §2): both are shown escaped, one row each."""
    import os
    import subprocess
    import sys

    run, images = trained
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(images / "a.png", folder / "a\nb.png")
    shutil.copy(images / "a.png", os.fsdecode(bytes(folder) + b"/c\xff.png"))
    env = os.environ | {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                        "PYTHONIOENCODING": "ascii:strict", "OMP_NUM_THREADS": "1"}
    for form, expected in (("table", {"a\\nb.png", "c\\xff.png"}),
                           ("csv", {"a\\nb.png", "c\\xff.png"})):
        done = subprocess.run([sys.executable, "-m", "oltr", "predict", str(run), str(folder),
                               "--format", form, "--device", "cpu"], env=env,
                              capture_output=True, check=False)
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode()
        lines = done.stdout.decode("ascii").splitlines()
        assert len(lines) == 3, lines  # a header, then one row per image
        names = {(line.split()[0] if form == "table" else line.split(",")[0]).rsplit("/", 1)[1]
                 for line in lines[1:]}
        assert names == expected
    done = subprocess.run([sys.executable, "-m", "oltr", "predict", str(run), str(folder),
                           "--format", "jsonl", "--device", "cpu"], env=env,
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    rows = [json.loads(line) for line in done.stdout.decode("ascii").splitlines()]
    assert sorted(Path(row["path"]).name for row in rows) == sorted(
        ["a\nb.png", os.fsdecode(b"c\xff.png")])
