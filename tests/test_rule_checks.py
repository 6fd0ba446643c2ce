"""The decision rule checked as one unit when it is built, saved and loaded (issue 24 §1):
another run's tensors, a threshold without a detector, a document without an open score, a
negative τ-normalisation, and a closed-set rule (threshold null) answered alike by predict,
evaluate, export and report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from oltr.artifact import saved_rule
from oltr.cli import main
from oltr.config import load_config
from oltr.decision import (
    DECISION_JSON,
    DECISION_TENSORS,
    DecisionRule,
    ForeignTensorsError,
    SplitOutputs,
    fit_decision_rule,
)
from oltr.errors import InputError
from oltr.evaluation.closed_open import evaluate_run
from oltr.evaluation.page import build_report
from oltr.export import ExportModule
from oltr.pipeline import train_run
from oltr.predict import Predictor


def _knn_rule(seed: int) -> DecisionRule:
    generator = np.random.default_rng(seed)
    logits = torch.as_tensor(generator.normal(size=(40, 3)), dtype=torch.float32)
    features = torch.as_tensor(generator.normal(size=(40, 4)), dtype=torch.float32)
    labels = torch.as_tensor(np.arange(40) % 3)
    split = SplitOutputs(logits=logits, features=features, labels=labels)
    return fit_decision_rule({"open_score": "knn"}, {"val": split, "train": split},
                             class_names=["a", "b", "c"], train_counts=[10, 20, 30])


_DROP = object()  # _edit: remove the key


def _edit(directory: Path, **changes) -> None:
    path = directory / DECISION_JSON
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            document.pop(key)
        else:
            document[key] = value
    path.write_text(json.dumps(document))



def test_tensors_of_another_rule_are_refused_by_name(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir(), other.mkdir()
    _knn_rule(0).save(mine)
    _knn_rule(1).save(other)
    assert json.loads((mine / DECISION_JSON).read_text())["tensors_sha256"]
    shutil.copy(other / DECISION_TENSORS, mine / DECISION_TENSORS)
    with pytest.raises(ForeignTensorsError, match=r"decision\.safetensors does not belong to "
                       r"this decision\.json \(sha256 .*refit with `oltr evaluate RUN --data "
                       r"DIR --open`") as caught:
        DecisionRule.load(mine)
    assert caught.value.path == str(mine / DECISION_TENSORS)
    info = {"weights_sha256": "x"}
    with pytest.raises(ForeignTensorsError):  # prediction refuses it
        saved_rule(mine, info)
    assert saved_rule(mine, info, refuse_stale=False) is None  # evaluation fits it anew


def test_a_rule_saved_before_the_tensor_hash_keeps_loading(tmp_path):
    _knn_rule(0).save(tmp_path)
    _edit(tmp_path, tensors_sha256=_DROP)
    assert DecisionRule.load(tmp_path).detector.name == "knn"


def test_a_threshold_without_a_detector_is_refused_when_built_and_when_loaded(tmp_path):
    with pytest.raises(InputError, match="a threshold needs an open score and its detector"):
        DecisionRule(class_names=["a", "b"], train_counts=torch.tensor([1, 2]), threshold=0.5)
    rule = _knn_rule(0)
    rule.detector = None  # made inconsistent after construction: save refuses it
    with pytest.raises(InputError, match="a threshold needs an open score and its detector"):
        rule.save(tmp_path)
    _knn_rule(0).save(tmp_path)
    _edit(tmp_path, open_score=None)
    with pytest.raises(InputError, match=r"a threshold needs an open score \('open_score' is "
                       r"null; a closed-set rule has threshold null\)"):
        DecisionRule.load(tmp_path)


def test_a_document_without_an_open_score_or_with_a_negative_tau_is_refused(tmp_path):
    _knn_rule(0).save(tmp_path)
    _edit(tmp_path, open_score=_DROP)
    with pytest.raises(InputError, match=r"lacks key 'open_score' \(a detector's name, or null "
                       r"for a closed-set rule\)"):
        DecisionRule.load(tmp_path)
    _knn_rule(0).save(tmp_path)
    _edit(tmp_path, tau_normalization=-5)
    with pytest.raises(InputError, match=r"'tau_normalization' must be ≥ 0") as caught:
        DecisionRule.load(tmp_path)
    assert caught.value.path == str(tmp_path / DECISION_JSON)
    for key, value, message in (("open_score", "nope", "unknown open score"),
                                ("threshold", "0.3", "'threshold' must be a finite number"),
                                ("open_score_logits", "other", "'open_score_logits' must be")):
        _knn_rule(0).save(tmp_path)
        _edit(tmp_path, **{key: value})
        with pytest.raises(InputError, match=message):
            DecisionRule.load(tmp_path)


def test_a_detector_that_learns_needs_its_state(tmp_path):
    _knn_rule(0).save(tmp_path)
    tensors = {k: v for k, v in load_file(str(tmp_path / DECISION_TENSORS)).items()
               if not k.startswith("detector.")}
    save_file(tensors, str(tmp_path / DECISION_TENSORS))
    _edit(tmp_path, tensors_sha256=_DROP)
    with pytest.raises(InputError, match="the open score's state does not fit 'knn'"):
        DecisionRule.load(tmp_path)


@pytest.fixture(scope="module")
def closed_run(fmnist_small, tmp_path_factory) -> Path:
    """A tiny trained run whose saved rule is made closed-set (threshold null)."""
    root = tmp_path_factory.mktemp("closed-rule")
    overrides = ["model.width=8", "train.batch_size=32", "train.max_steps_per_epoch=3",
                 "eval.batch_size=256", "train.epochs=1", "eval.open_score=msp",
                 f"data.image_root={fmnist_small / 'images'}"]
    run = root / "run"
    train_run(load_config("plain", overrides=overrides), fmnist_small, run, progress=False)
    rule = DecisionRule.load(run)
    rule.threshold = None
    rule.save(run)
    return run


def test_a_closed_set_rule_rejects_nothing_anywhere(closed_run, fmnist_small, tmp_path):
    run = closed_run
    predictor = Predictor.from_run(run, device="cpu")
    images = [fmnist_small / "images" / line.split()[0]
              for line in (fmnist_small / "open.txt").read_text().splitlines()[:8]]
    rows = predictor.predict_paths(images)
    assert all(row["label"] != -1 for row in rows)
    with pytest.raises(InputError, match=r"the run's decision rule is closed-set \(threshold "
                       r"null\).*--open-score NAME\|auto") as caught:
        evaluate_run(run, fmnist_small, open_set=True, device="cpu")
    assert caught.value.path == str(run / DECISION_JSON)
    report = evaluate_run(run, fmnist_small, open_set=False, device="cpu")
    assert report["closed"]["overall"] is not None
    page = build_report(run, fmnist_small, tmp_path / "report", device="cpu")
    assert "closed-set (threshold null" in page.read_text()
    module = ExportModule(predictor.net, predictor.rule)  # the exported graph, in torch
    batch = torch.stack([predictor.preprocess(path) for path in images])
    exported = module(batch)[2].numpy()
    assert module.threshold is None and (exported != -1).all()
    np.testing.assert_array_equal(exported, predictor.predict_batch(batch)["prediction"])


def test_predict_and_export_refuse_another_rules_tensors_and_evaluate_refits(
        closed_run, fmnist_small, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(closed_run, run)
    other = DecisionRule.load(run)
    other.train_counts = other.train_counts + 1
    other.save(tmp_path)
    shutil.copy(tmp_path / DECISION_TENSORS, run / DECISION_TENSORS)
    image = str(next((fmnist_small / "images").rglob("*.png")))
    for argv in (["predict", str(run), image],
                 ["export", str(run), "--onnx", str(tmp_path / "m.onnx")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert (f"{run / DECISION_TENSORS}: decision.safetensors does not belong to this "
                "decision.json (sha256 ") in err, err
    report = evaluate_run(run, fmnist_small, open_set=False, device="cpu")
    assert report["decision_rule"]["source"] == "fitted on val for this report"
    assert "fitting the rule anew" in capsys.readouterr().err
