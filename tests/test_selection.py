"""Selection never sees test: a behavioural test (issue 10). Two copies of a benchmark that
differ only in their test and open splits give identical selected values — best epochs, OLTR's
initial centroids and reachability scale, the τ of the logit adjustment and of
τ-normalisation, the open score chosen on val_open with its fitted state, the threshold."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from oltr.config import load_config
from oltr.data import curate
from oltr.data.sources import FASHION_MNIST_SYSTEM_DIR
from oltr.data.splits import sha256_file
from oltr.evaluation.closed_open import evaluate_run
from oltr.pipeline import train_run

TINY = ["model.width=8", "train.batch_size=32", "train.max_steps_per_epoch=2",
        "eval.batch_size=256", "deterministic=true", "train.amp=off"]


def _other_test_and_open(source: Path, target: Path) -> None:
    """``target``: ``source`` with other test and open splits (halves of the originals)."""
    shutil.copytree(source, target)
    for name, keep in (("test.txt", slice(1, None, 2)), ("open.txt", slice(None, None, 2))):
        lines = (source / name).read_text().splitlines(keepends=True)
        (target / name).write_text("".join(lines[keep]))
    manifest = json.loads((target / "manifest.json").read_text())
    for name in ("test.txt", "open.txt"):
        manifest["files"][name] = sha256_file(target / name)
    lines = (target / "open.txt").read_text().splitlines(keepends=True)
    opened = [line for line in (source / "open_classes.txt").read_text().splitlines(keepends=True)
              if line.split()[0] in {entry.split()[0] for entry in lines}]
    (target / "open_classes.txt").write_text("".join(opened))
    manifest["files"]["open_classes.txt"] = sha256_file(target / "open_classes.txt")
    manifest["counts"]["open"] = len(lines)
    (target / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def two_copies(tmp_path_factory) -> tuple[Path, Path]:
    if not FASHION_MNIST_SYSTEM_DIR.exists():
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("selection")
    curate("fashion-mnist", root / "a", seed=0, known=4, open=1, val_open=1, profile="exp",
           max_count=200, min_count=5, val_per_class=10, test_per_class=30)
    _other_test_and_open(root / "a", root / "b")
    return root / "a", root / "b"


def test_every_selected_value_is_the_same_whatever_the_test_and_open_splits(
        two_copies, tmp_path, one_thread):
    first, second = two_copies
    assert (first / "test.txt").read_text() != (second / "test.txt").read_text()
    assert (first / "val.txt").read_text() == (second / "val.txt").read_text()
    overrides = [*TINY, "stage1.train.epochs=2", "stage2.train.epochs=2",
                 "stage2.eval.logit_adjustment=auto", "eval.open_score=auto"]
    runs = []
    for data, name in ((first, "a"), (second, "b")):
        train_run(load_config("oltr", overrides=overrides), data, tmp_path / name,
                  progress=False)
        runs.append(tmp_path / name)
    for stage in ("stage1", "stage2"):
        histories = [[{k: v for k, v in json.loads(line).items()
                       if k not in ("images_per_second", "seconds")}  # timings differ
                      for line in (run / stage / "history.jsonl").read_text().splitlines()]
                     for run in runs]
        assert histories[0] == histories[1], stage  # best epochs, val accuracies
        weights = [load_file(str(run / stage / "model.safetensors")) for run in runs]
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:  # the centroids, the reachability scale, every weight
            assert (weights[0][key] == weights[1][key]).all(), key
    rules = [json.loads((run / "decision.json").read_text()) for run in runs]
    assert rules[0] == rules[1]  # τ, open score (chosen on val_open), threshold, records
    assert rules[0]["record"]["open_score"]["source"].startswith("selected on val_open")
    states = [load_file(str(run / "decision.safetensors")) for run in runs]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:  # the open score's fitted state
        assert (states[0][key] == states[1][key]).all(), key
    # evaluation applies the saved rule; a rule fitted there (other τ-normalisation of a
    # linear model) is fitted on val too: the same on both copies
    reports = [evaluate_run(run, data, open_set=True)
               for run, data in zip(runs, (first, second))]
    assert reports[0]["decision_rule"] == reports[1]["decision_rule"]
    assert reports[0]["open"]["threshold"] == reports[1]["open"]["threshold"]
    assert reports[0]["closed"] != reports[1]["closed"]  # the test splits do differ


def test_tau_normalisation_is_selected_on_val_whatever_the_test_split(two_copies, tmp_path,
                                                                       one_thread):
    first, second = two_copies
    overrides = [*TINY, "train.epochs=2", "eval.tau_normalization=auto",
                 "eval.logit_adjustment=auto", "eval.open_score=knn"]
    reports = []
    for data, name in ((first, "a"), (second, "b")):
        train_run(load_config("plain", overrides=overrides), data, tmp_path / name,
                  progress=False)
        reports.append(evaluate_run(tmp_path / name, data, open_set=True))
    assert reports[0]["tau_normalization"] == reports[1]["tau_normalization"]
    assert reports[0]["logit_adjustment"] == reports[1]["logit_adjustment"]
    assert reports[0]["decision_rule"] == reports[1]["decision_rule"]
