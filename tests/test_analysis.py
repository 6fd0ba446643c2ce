"""Fig. 8 analysis (paper §4.3): known-answer curves on hand-made outputs, PNG plots, the
open_classes.txt record, and `oltr analyze` on a tiny trained run."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from oltr import metrics
from oltr.cli import analyze as analyze_command
from oltr.data.curation import curate, load_open_classes
from oltr.data.splits import read_split_file, sha256_file
from oltr.errors import InputError
from oltr.evaluation.analysis import (
    PLOT_FILES,
    RunSpec,
    analyze,
    class_subsets,
    json_ready,
    longtail_curve,
    open_classes_curve,
    parse_plots,
    parse_run_specs,
    threshold_curve,
)
from oltr.evaluation.plots.curves import plot_open_classes, plot_threshold
from oltr.evaluation.run_outputs import RunOutputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = {"many_threshold": 100, "few_threshold": 20, "strict": True}


def probs_to_logits(rows):
    """Logits whose softmax is exactly the given rows (up to rounding)."""
    return np.log(np.asarray(rows, dtype=np.float64)).astype(np.float32)


def toy_outputs(val_max_probs=(0.9, 0.8, 0.75, 0.62)) -> RunOutputs:
    """2 classes (train counts 200 / 10: one many-shot, one few-shot class).

    known test: (label, softmax) = (0, [.9 .1]) ok, (0, [.6 .4]) ok, (1, [.3 .7]) ok,
    (1, [.8 .2]) wrong; open: [.55 .45] (open class 0), [.95 .05] (open class 1).
    """
    test = {"logits": probs_to_logits([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]),
            "labels": np.array([0, 0, 1, 1])}
    opened = {"logits": probs_to_logits([[0.55, 0.45], [0.95, 0.05]]),
              "labels": np.array([-1, -1])}
    val = {"logits": probs_to_logits([[p, 1 - p] for p in val_max_probs]),
           "labels": np.zeros(len(val_max_probs), dtype=np.int64)}
    for split in (test, opened, val):
        split["features"] = np.zeros((len(split["labels"]), 3), dtype=np.float32)
    return RunOutputs(
        splits={"test": test, "open": opened, "val": val}, train_counts=np.array([200, 10]),
        group_kw=dict(GROUPS), centroids=None, logit_adjustment=0.0,
        logit_adjustment_source="given", tau_normalization=0.0, tau_normalization_source=None,
        info={}, stage_cfg={}, skipped={},
    )


# --------------------------------------------------------------------------- (b) threshold


def test_threshold_curve_hand_computed_two_class_toy():
    curve = threshold_curve(toy_outputs(), [1.0, 0.65, 0.0, 0.85, 0.65])
    assert curve["probability"] == [0.0, 0.65, 0.85, 1.0]  # sorted, de-duplicated
    assert curve["score_threshold"] == pytest.approx([1.0, 0.35, 0.15, 0.0])
    # p = 0: nothing rejected. 3 known correct of 6 images; TP 3, FP 1, FN 2.
    # p = .65: k2 (.6) and o1 (.55) rejected: correct k1, k3, o1; TP 2, FP 2, FN 1.
    # p = .85: only k1 (.9) and o2 (.95) accepted: correct k1, o1; TP 1, FP 3, FN 1.
    # p = 1: everything rejected: correct o1, o2; TP 0.
    assert curve["overall"] == pytest.approx([3 / 6, 3 / 6, 2 / 6, 2 / 6])
    assert curve["many"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert curve["few"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert curve["medium"] == [None] * 4
    assert curve["precision"] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert curve["recall"] == pytest.approx([0.6, 2 / 3, 0.5, 0.0])
    assert curve["f_measure"] == pytest.approx([2 / 3, 4 / 7, 1 / 3, 0.0])
    assert curve["known_acceptance_rate"] == pytest.approx([1.0, 0.75, 0.25, 0.0])
    assert curve["open_rejection_rate"] == pytest.approx([0.0, 0.5, 0.5, 1.0])
    assert curve["closed_overall"] == 0.75 and curve["num_classes"] == 2


def test_threshold_zero_rejects_nothing_so_known_accuracy_is_the_closed_accuracy():
    rng = np.random.default_rng(0)
    counts = np.array([500, 120, 60, 30, 10, 5])
    labels = rng.integers(0, 6, 300)
    logits = rng.normal(size=(300, 6)).astype(np.float32)
    logits[np.arange(300), labels] += 1.5
    outputs = toy_outputs()
    outputs.splits["test"] = {"logits": logits, "labels": labels}
    outputs.splits["open"] = {"logits": rng.normal(size=(40, 6)).astype(np.float32),
                              "labels": np.full(40, -1)}
    outputs.train_counts = counts
    # every max softmax is >= 1/6: p = 0 and p = 0.1 (the paper's) reject nothing
    curve = threshold_curve(outputs, [0.0, 0.1])
    closed = metrics.closed_set_accuracy(logits.argmax(1), labels, counts, **GROUPS)
    for i in range(2):
        for group in ("many", "medium", "few"):
            assert curve[group][i] == pytest.approx(closed[group])
        assert curve["known_acceptance_rate"][i] == 1.0
        assert curve["open_rejection_rate"][i] == 0.0
        assert curve["precision"][i] == pytest.approx(closed["overall"])
        # all 300 known and 40 open images; only known ones can be right
        assert curve["overall"][i] == pytest.approx(closed["overall"] * 300 / 340)


def test_threshold_curve_input_errors():
    with pytest.raises(InputError, match=r"probability must lie in \[0, 1\].*1.5"):
        threshold_curve(toy_outputs(), [0.2, 1.5])
    with pytest.raises(InputError, match="at least one"):
        threshold_curve(toy_outputs(), [])
    outputs = toy_outputs()
    del outputs.splits["open"]
    with pytest.raises(InputError, match="no 'open' split"):
        threshold_curve(outputs)


# --------------------------------------------------------------------------- (c) open classes


def test_open_classes_curve_hand_computed_two_class_toy():
    # val max softmax .9 .8 .75 .62 → scores .1 .2 .25 .38; accepting 75 % gives t = .25:
    # reject max softmax < .75, i.e. k2 (.6), k3 (.7) and o1 (.55); k1, k4, o2 are accepted.
    curve = open_classes_curve(toy_outputs(), [0, 1], accept_rate=0.75, open_score="msp")
    assert curve["threshold"] == pytest.approx(0.25)
    assert curve["num_open_classes"] == [0, 1, 2]
    assert curve["num_subsets"] == [1, 2, 1]
    assert curve["num_open_images"] == [0.0, 1.0, 2.0]
    # k = 0: known only, only k1 right: accuracy 1/4; TP 1, FP 3, FN 0 → F = 2·.25/1.25 = .4
    # k = 1: {o1} rejected → 2/5, F .4;  {o2} accepted → 1/5, FN 1 → F = 1/3
    # k = 2: 2/6, F = 1/3
    assert curve["overall"] == pytest.approx([0.25, 0.3, 1 / 3])
    assert curve["overall_std"] == pytest.approx([0.0, 0.1, 0.0])
    assert curve["f_measure"] == pytest.approx([0.4, (0.4 + 1 / 3) / 2, 1 / 3])
    assert curve["many"] == pytest.approx([0.5, 0.5, 0.5])  # open images leave these alone
    assert curve["few"] == pytest.approx([0.0, 0.0, 0.0])
    assert curve["open_rejection_rate"][0] is None
    assert curve["open_rejection_rate"][1:] == pytest.approx([0.5, 0.5])


def test_zero_open_classes_equals_the_known_only_figures():
    outputs = toy_outputs()
    curve = open_classes_curve(outputs, [0, 1], open_score="msp")  # default: accept 95 % of val
    test = outputs.splits["test"]
    from oltr.openset import msp_score

    threshold = metrics.calibrate_threshold(msp_score(outputs.splits["val"]["logits"]), 0.95)
    rejected = metrics.reject(test["logits"].argmax(1), msp_score(test["logits"]), threshold)
    known_only = metrics.f_measure(rejected, test["labels"])
    accuracy = metrics.open_set_accuracy(rejected, test["labels"], outputs.train_counts,
                                         **GROUPS)
    assert curve["f_measure"][0] == pytest.approx(known_only["f_measure"])
    assert curve["recall"][0] == 1.0  # no open image, no false negative
    assert curve["overall"][0] == pytest.approx(accuracy["overall"])
    # the last point (all open classes) is the ordinary open-set evaluation
    full = threshold_curve(outputs, [1 - threshold])
    assert curve["overall"][-1] == pytest.approx(full["overall"][0])
    assert curve["f_measure"][-1] == pytest.approx(full["f_measure"][0])


def test_open_classes_curve_input_errors():
    with pytest.raises(InputError, match="one class per open image"):
        open_classes_curve(toy_outputs(), [0, 1, 1])
    with pytest.raises(InputError, match=">= 0"):
        open_classes_curve(toy_outputs(), [0, -1])
    with pytest.raises(InputError, match="out of range"):
        open_classes_curve(toy_outputs(), [0, 3], num_open_classes=2)
    with pytest.raises(InputError, match="integer"):
        open_classes_curve(toy_outputs(), [0.0, 1.0])


def test_class_subsets_all_or_a_seeded_distinct_sample():
    rng = np.random.default_rng(0)
    assert class_subsets(4, 2, 20, rng) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert class_subsets(4, 0, 20, rng) == [()]
    sample = class_subsets(10, 5, 20, np.random.default_rng(1))
    assert len(sample) == len(set(sample)) == 20
    assert all(len(s) == 5 and list(s) == sorted(s) for s in sample)
    assert sample == class_subsets(10, 5, 20, np.random.default_rng(1))
    with pytest.raises(InputError):
        class_subsets(3, 4, 20, rng)


# --------------------------------------------------------------------------- (a) longtail


def fake_report(per_class, overall, f):
    return {"closed": {"overall": overall, "many": per_class[0], "medium": None, "few": None,
                       "per_class": per_class},
            "open": {"overall": overall / 2, "f_measure": f, "auroc": 0.7}}


def test_longtail_curve_sorts_by_ratio_and_averages_head_and_tail_thirds():
    steep = fake_report([0.9, 0.8, 0.5, 0.4, 0.2, 0.1], 0.48, 0.5)
    flat = fake_report([0.9, 0.9, 0.8, 0.8, 0.7, 0.7], 0.8, 0.7)
    curve = longtail_curve([(800.0, steep), (10.0, flat)])
    assert curve["imbalance_ratio"] == [10.0, 800.0]
    assert curve["closed_overall"] == [0.8, 0.48]
    assert curve["closed_head"] == pytest.approx([0.9, 0.85])
    assert curve["closed_tail"] == pytest.approx([0.7, 0.15])
    assert curve["closed_few"] == [None, None]
    assert curve["open_f_measure"] == [0.7, 0.5]
    # class frequency from train counts: here label 0 is the rarest class
    reverse = longtail_curve([(800.0, steep)], train_counts=[[5, 19, 73, 277, 1052, 4000]])
    assert reverse["closed_head"] == pytest.approx([0.15])
    assert reverse["closed_tail"] == pytest.approx([0.85])
    with pytest.raises(InputError, match=">= 1"):
        longtail_curve([(0.5, steep)])
    with pytest.raises(InputError, match="one list per point"):
        longtail_curve([(10.0, steep)], train_counts=[])


# --------------------------------------------------------------------------- plots


def test_plots_are_written_as_png_files(tmp_path):
    outputs = toy_outputs()
    threshold = {"plain": threshold_curve(outputs),
                 "oltr": threshold_curve(outputs, [0.0, 0.5, 0.9])}
    path = plot_threshold(threshold, tmp_path / "sub" / "b.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300
    curves = {"plain": open_classes_curve(outputs, [0, 1], open_score="msp")}
    path = plot_open_classes(curves, tmp_path / "c.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert not list(tmp_path.rglob(".*"))  # no temporary left over
    json.dumps(json_ready(curves))  # the curves are JSON-ready


def test_json_ready_rounds_and_maps_nan_to_none():
    assert json_ready({"a": [np.float32(0.5), float("nan"), np.int64(3)], 2: (1 / 3,)}) == {
        "a": [0.5, None, 3], "2": [0.333333]}


# --------------------------------------------------------------------------- data and driver


def test_open_classes_file_matches_open_txt_and_split_files_are_unchanged(fmnist_small):
    names, of_image = load_open_classes(fmnist_small)
    manifest = json.loads((fmnist_small / "manifest.json").read_text())
    assert names == manifest["open_classes"] and len(names) == 1
    opened = read_split_file(fmnist_small / "open.txt")
    lines = (fmnist_small / "open_classes.txt").read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == [path for path, _ in opened]
    assert of_image.tolist() == [0] * len(opened) == [int(x.rsplit(" ", 1)[1]) for x in lines]
    assert manifest["files"]["open_classes.txt"] == sha256_file(
        fmnist_small / "open_classes.txt")
    # the split files are byte-identical to those curated before open_classes.txt existed
    before = {
        "classes.txt": "025e059b17d8aaebb33cb445442576cfa2e5aadb5a186514471ed3817254db09",
        "open.txt": "a913d3c6fd66733695f5a0809fee999fc6d3d8a5437846b58c993081f5602fac",
        "test.txt": "fb25b95e777b4ed1ed21d50f3f54c9405aa6e64d70e7028476177cd43f524f32",
        "train.txt": "521d333607b305ccbdc011acd51cbfa316d757f1d3c47e9e7a5988cbf98eefb1",
        "val.txt": "bb1e3867eaf11f1991216a9a516af866b499d9a7c8d168d3ed9bd0a9469be3e2",
    }
    assert {name: sha256_file(fmnist_small / name) for name in before} == before


def tiny_folder_benchmark(root, name, min_count):
    """A 4-known + 2-open folder benchmark of 8 px PNGs (train counts 40 → min_count)."""
    tree = root / "tree"
    if not tree.exists():
        for c in range(6):
            for i in range(50):
                path = tree / f"c{c}" / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (8, 8), (c * 40 + i) % 256).save(path)
    out = root / name
    curate(f"folder:{tree}", out, seed=0, known=4, open=2, profile="exp", max_count=40,
           min_count=min_count, val_per_class=2, test_per_class=3)
    return out


def test_analyze_longtail_from_reports_and_input_errors(tmp_path):
    flat = tiny_folder_benchmark(tmp_path, "flat", 20)
    steep = tiny_folder_benchmark(tmp_path, "steep", 4)
    reports = {
        tmp_path / "plain-flat": fake_report([0.9, 0.9, 0.8, 0.7], 0.82, 0.7),
        tmp_path / "plain-steep": fake_report([0.9, 0.8, 0.3, 0.1], 0.52, 0.5),
        tmp_path / "oltr-flat": fake_report([0.9, 0.9, 0.8, 0.8], 0.85, 0.75),
        tmp_path / "oltr-steep": fake_report([0.85, 0.8, 0.6, 0.5], 0.69, 0.65),
    }
    specs = [RunSpec(name.split("-")[0], path, flat if name.endswith("flat") else steep)
             for name, path in ((p.name, p) for p in reports)]
    result = analyze(specs, tmp_path / "out", plots=["longtail"], reports=reports)
    png = tmp_path / "out" / PLOT_FILES["longtail"]
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((tmp_path / "out" / "analysis.json").read_text()) == result
    plain = result["curves"]["longtail"]["plain"]
    assert plain["imbalance_ratio"] == [2.0, 10.0]
    assert plain["closed_tail"] == [0.7, 0.1]  # 4 classes: the rarest third is one class

    again = analyze(specs, tmp_path / "out", plots=["longtail"], reports=reports)
    assert again == result  # its own files are replaced

    # a user's files of the same names are never replaced (README: oltr never overwrites
    # what it did not write)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / PLOT_FILES["longtail"]).write_bytes(b"my picture")
    with pytest.raises(InputError, match="not written by oltr analyze"):
        analyze(specs, mine, plots=["longtail"], reports=reports)
    assert (mine / PLOT_FILES["longtail"]).read_bytes() == b"my picture"
    (mine / PLOT_FILES["longtail"]).unlink()
    (mine / "analysis.json").write_text('{"mine": 1}')
    with pytest.raises(InputError, match="analysis.json there was not written by oltr"):
        analyze(specs, mine, plots=["longtail"], reports=reports)
    assert (mine / "analysis.json").read_text() == '{"mine": 1}'

    with pytest.raises(InputError, match="two or more benchmarks"):
        analyze(specs[:1], tmp_path / "out", plots=["longtail"], reports=reports)
    with pytest.raises(InputError, match="unknown plot.*'fig9'"):
        parse_plots("threshold,fig9")
    with pytest.raises(InputError, match="NAME=RUN_DIR"):
        parse_run_specs(["plain"])
    with pytest.raises(InputError, match="missing-run: run directory not found"):
        parse_run_specs([f"plain={tmp_path / 'missing-run'}"], flat)
    (tmp_path / "no-info").mkdir()
    with pytest.raises(InputError, match=r"run.json.*give --data"):
        parse_run_specs([f"plain={tmp_path / 'no-info'}"])


def analysis_parser():
    parser = argparse.ArgumentParser(prog="oltr")
    sub = parser.add_subparsers(dest="command", required=True)
    analyze_command.register(sub)
    return parser


def test_analyze_command_on_a_tiny_trained_run(fmnist_small, tmp_path, tiny, one_thread,
                                               capsys):
    from oltr.config import load_config
    from oltr.pipeline import train_run

    run = tmp_path / "plain"
    config = load_config("plain", overrides=[*tiny, "train.epochs=1"])
    train_run(config, fmnist_small, run, progress=False)
    args = analysis_parser().parse_args(
        ["analyze", "--runs", f"plain={run}", f"copy={run}", "--out", str(tmp_path / "fig"),
         "--probabilities", "0,0.5,0.9"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    for name in ("threshold", "open-classes"):
        path = tmp_path / "fig" / PLOT_FILES[name]
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert str(path) in printed
    result = json.loads((tmp_path / "fig" / "analysis.json").read_text())
    curve = result["curves"]["threshold"]["plain"]
    assert curve["probability"] == [0.0, 0.5, 0.9]
    assert curve["known_acceptance_rate"][0] == 1.0
    opened = result["curves"]["open-classes"]["plain"]
    assert opened["num_open_classes"] == [0, 1] and opened["recall"][0] == 1.0
    assert result["curves"]["open-classes"]["copy"] == opened  # the same run twice
    # the data comes from run.json when --data is left out; a bad --plots names the value
    args = analysis_parser().parse_args(
        ["analyze", "--runs", f"plain={run}", "--out", str(tmp_path / "x"), "--plots", "oops"])
    with pytest.raises(InputError, match="'oops'"):
        args.func(args)
