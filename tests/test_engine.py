"""The shared training loop on real Fashion-MNIST: smoke runs, two stages, resume, checkpoints."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from oltr.config import load_config
from oltr.errors import InputError, OltrError
from oltr.evaluation.closed_open import evaluate_run
from oltr.pipeline import check_run, train_run
from oltr.predict import Predictor
from oltr.run import final_stage_dir
from oltr.train import lr_factor
from oltr.train.checkpoint import load_checkpoint


def test_lr_factor_schedules() -> None:
    kw = {"total_steps": 100, "steps_per_epoch": 10, "step_size": 3, "gamma": 0.1,
          "warmup_steps": 0}
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_factor(29, schedule="step", **kw) == pytest.approx(1.0)
    assert lr_factor(30, schedule="step", **kw) == pytest.approx(0.1)
    assert lr_factor(60, schedule="step", **kw) == pytest.approx(0.01)
    assert lr_factor(4, schedule="constant", **(kw | {"warmup_steps": 10})) == pytest.approx(0.5)


def test_plain_train_evaluate_predict(fmnist_small, tiny, tmp_path) -> None:
    run = tmp_path / "plain"
    config = load_config("plain", overrides=[*tiny, "train.epochs=2"])
    (result,) = train_run(config, fmnist_small, run, progress=False)
    assert result.epochs_run == 2 and 1 <= result.best_epoch <= 2
    history = [json.loads(line) for line in (run / "main" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    report = evaluate_run(run, fmnist_small, open_set=True, output=run / "report.json")
    assert set(report["closed"]) >= {"overall", "many", "medium", "few", "counts"}
    assert set(report["open"]) >= {"overall", "many", "medium", "few", "f_measure", "auroc",
                                   "fpr95", "threshold"}
    assert report["open"]["num_known"] == 4 * 30 and report["open"]["num_open"] == 30
    assert 0.0 <= report["closed"]["overall"] <= 1.0
    # Calibrated on val: at least 95 % of the known val images are accepted by construction.
    assert "calibrated on val" in report["open"]["threshold_source"]
    saved = json.loads((run / "report.json").read_text())
    assert saved["closed"] == report["closed"]

    images = sorted((fmnist_small / "images").rglob("*.png"))[:3]
    rows = Predictor.from_run(run).predict_paths(images)
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for row in rows:
        assert row["label"] == -1 or row["label_name"] == row["closed_set_label"]
        assert (row["label"] == -1) == (row["open_score"] > saved["open"]["threshold"])


def test_verbose_false_trains_silently(fmnist_small, tiny, tmp_path, capsys) -> None:
    """``train_run(progress=False, verbose=False)``: nothing on standard output (an embedding
    program's own output stays clean); the default prints the stage lines and the rule."""
    config = load_config("oltr", overrides=[*tiny, "stage1.train.epochs=1",
                                            "stage2.train.epochs=1"])
    train_run(config, fmnist_small, tmp_path / "quiet", progress=False, verbose=False)
    assert capsys.readouterr().out == ""
    assert (tmp_path / "quiet" / "decision.json").exists()
    train_run(config, fmnist_small, tmp_path / "talks", progress=False)
    out = capsys.readouterr().out
    assert "[stage1] epoch 1/1" in out and "[stage2] epoch 1/1" in out
    assert "decision rule:" in out


def test_oltr_two_stages_initialise_memory(fmnist_small, tiny, tmp_path) -> None:
    run = tmp_path / "oltr"
    config = load_config("oltr", overrides=[*tiny, "stage1.train.epochs=1",
                                            "stage2.train.epochs=1"])
    results = train_run(config, fmnist_small, run, progress=False)
    assert [r.stage_dir.name for r in results] == ["stage1", "stage2"]
    assert final_stage_dir(run) == run / "stage2"
    stage1 = load_file(str(run / "stage1" / "model.safetensors"))
    stage2 = load_file(str(run / "stage2" / "model.safetensors"))
    centroids = stage2["meta_embedding.centroids"]
    assert centroids.shape == (4, 64) and torch.isfinite(centroids).all()
    assert centroids.abs().sum() > 0  # initialised as class means, then learned
    assert not torch.equal(stage1["backbone.conv1.weight"], stage2["backbone.conv1.weight"])
    report = evaluate_run(run, fmnist_small, open_set=True, open_score="reachability")
    assert report["open"]["open_score"] == "reachability"


def test_resume_after_crash_matches_uninterrupted(fmnist_small, tiny, tmp_path) -> None:
    overrides = [*tiny, "train.epochs=3", "deterministic=true"]
    reference = tmp_path / "reference"
    train_run(load_config("plain", overrides=overrides), fmnist_small, reference, progress=False)

    crashed = tmp_path / "crashed"

    def crash_in_second_epoch(*_args):  # before every optimiser step
        if (crashed / "main" / "checkpoint.pt").exists():  # epoch 1 is done
            raise KeyboardInterrupt  # a kill in the middle of epoch 2

    hook = register_optimizer_step_pre_hook(crash_in_second_epoch)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_run(load_config("plain", overrides=overrides), fmnist_small, crashed,
                      progress=False)
    finally:
        hook.remove()
    assert load_checkpoint(crashed / "main" / "checkpoint.pt")["epoch"] == 1
    (result,) = train_run(load_config("plain", overrides=overrides), fmnist_small, crashed,
                          resume=True, progress=False)
    assert result.epochs_run == 2
    final = torch.load(crashed / "main" / "checkpoint.pt", weights_only=True)["model"]
    expected = torch.load(reference / "main" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


def test_run_dir_not_empty_without_resume(fmnist_small, tiny, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    with pytest.raises(InputError, match="--resume"):
        train_run(load_config("plain", overrides=tiny), fmnist_small, run, progress=False)


def test_resume_with_different_config_is_refused(fmnist_small, tiny, tmp_path) -> None:
    run = tmp_path / "run"
    train_run(load_config("plain", overrides=[*tiny, "train.epochs=1"]), fmnist_small, run,
              progress=False)
    with pytest.raises(InputError, match="differs from the saved one"):
        train_run(load_config("plain", overrides=[*tiny, "train.epochs=2"]), fmnist_small, run,
                  resume=True, progress=False)


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": 1, "model": _RunsCode()}, handle)
    with pytest.raises(InputError, match="checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_non_finite_loss_stops_and_keeps_checkpoint(fmnist_small, tiny, tmp_path) -> None:
    run = tmp_path / "run"
    overrides = [*tiny, "train.epochs=2", "train.lr=1e30", "train.schedule=constant"]
    with pytest.raises(OltrError, match="non-finite training loss"):
        train_run(load_config("plain", overrides=overrides), fmnist_small, run, progress=False)


def test_auto_reachability_scale_puts_median_meta_norm_at_one() -> None:
    from oltr.models import create_network

    torch.manual_seed(0)
    net = create_network({"backbone": "resnet10_small", "width": 8, "classifier": "cosine",
                          "meta_embedding": True, "reachability_scale": "auto"}, 3, 1)
    features = torch.randn(101, net.meta_embedding.feat_dim) * 5
    net.meta_embedding.init_centroids(torch.randn(3, net.meta_embedding.feat_dim))
    scale = net.calibrate_reachability_scale(features)
    norms = net.meta_embedding(features)["meta"].detach().norm(dim=1)
    assert float(net.meta_embedding.reachability_scale) == pytest.approx(scale)
    assert float(norms.median()) == pytest.approx(1.0, rel=1e-5)


def test_stages_one_at_a_time_and_centroids_start_as_class_means(fmnist_small, tiny,
                                                                 tmp_path) -> None:
    """`--stage stage1`, then `--stage stage2` with 0 epochs: the saved memory holds the class
    means of direct train features computed with the stage-2 feature model (one pass)."""
    import numpy as np

    from oltr.config import stage_config
    from oltr.data import dataset_for, load_benchmark
    from oltr.inference import collect_outputs, eval_loader, load_model

    run = tmp_path / "oltr"
    overrides = [*tiny, "stage1.train.epochs=1", "stage2.train.epochs=0"]
    config = load_config("oltr", overrides=overrides)
    (first,) = train_run(config, fmnist_small, run, progress=False, stages=["stage1"])
    assert first.stage_dir.name == "stage1" and not (run / "stage2").exists()
    (second,) = train_run(config, fmnist_small, run, progress=False, stages=["stage2"])
    assert second.stage_dir.name == "stage2"
    with pytest.raises(InputError, match="no stage named stage3"):
        train_run(config, fmnist_small, run, progress=False, stages=["stage3"])

    net, _ = load_model(run / "stage2")
    cfg = stage_config(config, "stage2")
    bench = load_benchmark(fmnist_small)
    outputs = collect_outputs(net, eval_loader(dataset_for(bench, "train", cfg["data"],
                                                           train=False), 256, 0),
                              torch.device("cpu"))
    expected = np.stack([outputs["features"][outputs["labels"] == k].mean(axis=0)
                         for k in range(bench.num_classes)])
    centroids = net.meta_embedding.centroids.detach().numpy()
    assert np.allclose(centroids, expected, atol=1e-4)
    # auto reachability scale: the median |v_meta| over the train set is 1 at the start.
    meta = net.meta_embedding(torch.from_numpy(outputs["features"]))["meta"]
    assert float(meta.norm(dim=1).median()) == pytest.approx(1.0, rel=1e-3)


def test_tensorboard_logs_losses_and_val_accuracies_per_shot_group(fmnist_small, tiny, tmp_path,
                                                                   one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config("plain", overrides=[*tiny, "train.epochs=2"])
    train_run(config, fmnist_small, tmp_path / "run", progress=False,
              tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"main/step/loss", "main/step/lr", "main/epoch/val_accuracy", "main/epoch/val_many",
            "main/epoch/val_few", "main/epoch/train_loss"} <= tags
    assert [event.step for event in events.Scalars("main/epoch/val_accuracy")] == [3, 6]


def test_a_preset_on_pretrained_weights_refuses_to_start_from_scratch(fmnist_small, tmp_path):
    """places_lt / ms1m_lt presets start from ImageNet weights (train.require_pretrained): a
    stage that would start from nothing without model.pretrained_path fails before anything
    is created, naming the key and the way out; a stage starting from the previous stage or
    a weights file is fine, and so is train.require_pretrained=false."""
    for benchmark in ("places_lt", "ms1m_lt"):
        config = load_config("plain", benchmark=benchmark)
        with pytest.raises(InputError, match=r"stage 'main' starts from ImageNet-pretrained "
                                             r"resnet\d+ weights.*model\.pretrained_path is not "
                                             r"set.*train\.require_pretrained=false"):
            check_run(config, fmnist_small, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    check_run(load_config("plain", benchmark="places_lt",
                          overrides=["train.require_pretrained=false"]),
              fmnist_small, tmp_path / "run")
    weights = tmp_path / "resnet152.pth"
    weights.write_bytes(b"checked for existence only here")
    check_run(load_config("oltr", benchmark="places_lt",
                          overrides=[f"model.pretrained_path={weights}"]),
              fmnist_small, tmp_path / "run")
    with pytest.raises(InputError, match="stage 'stage2' starts from"):
        check_run(load_config("oltr", benchmark="places_lt", overrides=[
            f"stage1.model.pretrained_path={weights}", "stage2.train.init_from=none"]),
            fmnist_small, tmp_path / "run")


def test_an_incomplete_run_is_named_as_such(fmnist_small, tiny, tmp_path, capsys):
    """A run whose final stage has no weights yet names each stage's progress and the way
    on; evaluating a stage that stopped early says so and records it in the report."""
    run = tmp_path / "oltr"
    config = load_config("oltr", overrides=[*tiny, "stage1.train.epochs=1",
                                            "stage2.train.epochs=1"])
    train_run(config, fmnist_small, run, progress=False, stages=["stage1"])
    with pytest.raises(InputError, match=r"the run is incomplete: its final stage 'stage2' has "
                                         r"no weights yet \(stage1: done; stage2: not started\)"
                                         r".*--resume"):
        evaluate_run(run, fmnist_small, open_set=False)
    report = evaluate_run(run / "stage1", fmnist_small, open_set=False)
    assert report["stage_epochs"] == {"finished": 1, "configured": 1}
    history = run / "stage1" / "history.jsonl"
    history.write_text("")  # as if killed before its first epoch was recorded
    capsys.readouterr()
    report = evaluate_run(run / "stage1", fmnist_small, open_set=False)
    assert report["stage_epochs"] == {"finished": 0, "configured": 1}
    assert "stopped at epoch 0 of 1" in capsys.readouterr().err

def test_a_config_edited_in_python_is_checked_before_anything_is_created(fmnist_small, tmp_path):
    for section, key, value, message in (
            ("train", "lr", "fast", r"config key 'train\.lr' must be"),
            ("train", "batch_size", 0, r"config key 'train\.batch_size' must be"),
            ("train", "lrr", 0.1, r"unknown config key 'train\.lrr'"),
            ("eval", "open_score", "foo", r"config key 'eval\.open_score' must be")):
        config = load_config("plain")
        config[section][key] = value
        with pytest.raises(InputError, match=message):
            train_run(config, fmnist_small, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()
    config = load_config("plain", overrides=["eval.open_score=knn"])
    config["eval"]["open_score_options"] = {"kk": 3}
    with pytest.raises(InputError, match=r"eval\.open_score_options.*detector 'knn': bad options"):
        train_run(config, fmnist_small, tmp_path / "run", progress=False)
    with pytest.raises(InputError, match=r"ODIN's input perturbation"):
        load_config("plain", overrides=["eval.open_score=odin",
                                        "eval.open_score_options={epsilon: 0.01}"])
    load_config("plain", overrides=["eval.open_score=odin",
                                    "eval.open_score_options={temperature: 100}"])
