"""``oltr bench``: epoch rescaling, the stage cache's keys, a small real bench (shared stages,
reuse on a second call, tables), and the command line."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oltr import bench as bench_module
from oltr.bench import DONE, run_bench, scale_epochs, stage_key
from oltr.cli import main
from oltr.config import load_config, stage_config
from oltr.errors import InputError
from oltr.evaluation.closed_open import evaluate_run
from oltr.ownership import write_marker


def _epochs(config: dict) -> list[int]:
    return [stage_config(config, s["name"])["train"]["epochs"] for s in config["stages"]]


# ------------------------------------------------------------------ 8. scale_epochs
def test_scale_epochs_keeps_each_stage_share():
    oltr = load_config("oltr")
    assert _epochs(oltr) == [22, 8]
    scaled = scale_epochs(oltr, 15)
    assert _epochs(scaled) == [11, 4]  # round(22 · 15/30) = 11, the rest 4
    assert _epochs(scale_epochs(load_config("crt"), 2)) == [1, 1]  # round(1.47) = 1, rest 1
    assert _epochs(scale_epochs(load_config("plain"), 15)) == [15]
    assert _epochs(scale_epochs(load_config("plain"), 1)) == [1]


def test_scale_epochs_moves_the_drw_start_with_its_stage():
    config = load_config("ldam_drw")
    assert _epochs(config) == [30] and config["train"]["drw_epoch"] == 25
    scaled = scale_epochs(config, 15)
    main_stage = stage_config(scaled, "main")["train"]
    assert main_stage["epochs"] == 15
    # the docstring's rule: round(drw · new / old), within 1..new
    assert main_stage["drw_epoch"] == min(15, max(1, round(25 * 15 / 30))) == 12
    assert stage_config(scale_epochs(load_config("ldam_drw"), 60), "main")["train"][
        "drw_epoch"] == 50
    # presets without DRW keep none
    assert stage_config(scale_epochs(load_config("plain"), 5), "main")["train"][
        "drw_epoch"] is None


def test_scale_epochs_below_one_epoch_per_stage_is_refused():
    with pytest.raises(InputError, match="number of stages"):
        scale_epochs(load_config("oltr"), 1)
    with pytest.raises(InputError):
        scale_epochs(load_config("plain"), 0)


def test_scale_epochs_total_is_exact_when_a_late_stage_is_small():
    config = load_config("crt", overrides=["stage1.train.epochs=29", "stage2.train.epochs=1"])
    # 29 + 1 → 2 in all, at least 1 each: the only answer is 1 + 1
    assert _epochs(scale_epochs(config, 2)) == [1, 1]


# ------------------------------------------------------------------ 9. stage_key
def _key(method: str, stage: str = "main", previous: str | None = None, overrides=()) -> str:
    return stage_key(stage_config(load_config(method, overrides=list(overrides)), stage), previous)


def test_stage_key_ignores_method_and_eval_only():
    plain = _key("plain")
    assert len(plain) == 16 and int(plain, 16) >= 0
    assert _key("tau_norm") == plain  # differs in method and eval.tau_normalization
    assert _key("logit_adjustment") == plain  # eval.logit_adjustment
    assert _key("plain", overrides=["eval.accept_rate=0.9", "eval.open_score=energy"]) == plain
    assert _key("plain", overrides=["seed=1"]) != plain
    assert _key("plain", overrides=["train.lr=0.05"]) != plain
    assert _key("class_aware") != plain
    # the plain stage 1 of the two-stage methods is one training
    stage1 = {_key(m, "stage1") for m in ("crt", "lws", "fslwf", "oltr")}
    assert len(stage1) == 1
    # a stage's key depends on the stage it starts from
    assert _key("crt", "stage2", "a" * 16) != _key("crt", "stage2", "b" * 16)
    assert _key("crt", "stage2", "a" * 16) != _key("crt", "stage2", None)
    assert _key("crt", "stage2", "a" * 16) != _key("lws", "stage2", "a" * 16)


# ------------------------------------------------------------------ 10. run_bench
METHODS = ["plain", "tau_norm", "crt", "oltr"]
DETECTORS = ["msp", "knn"]


def _bench(data: Path, out: Path, **kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_bench(data, out, **({"methods": METHODS, "detectors": DETECTORS,
                                        "seeds": [0], "epochs": 2, "quick": True} | kwargs))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench_run(fmnist_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    return out, _bench(fmnist_small, out)


def _stage_state(out: Path) -> dict[str, tuple[bytes, int]]:
    return {path.parent.name: (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted((out / "stages").glob(f"*/{DONE}"))}


def test_bench_writes_tables_with_every_method_and_detector(bench_run):
    out, results = bench_run
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["methods"] == METHODS and saved["detectors"] == DETECTORS
    assert saved["seeds"] == [0] and saved["epochs"] == 2 and saved["quick"] is True
    table = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
        entry = saved["summary"][method]
        assert sorted(entry["detectors"]) == sorted(DETECTORS)
        assert entry["closed"]["overall"]["n"] == 1
        report = saved["reports"][method][0]
        assert entry["closed"]["overall"]["mean"] == pytest.approx(report["closed"]["overall"])
        assert entry["closed"]["overall"]["std"] == 0.0
        assert sorted(report["detectors"]) == sorted(DETECTORS)
    assert table.count("| method | msp | knn |") == 3  # AUROC, FPR95, detection error
    # epochs rescaled to 2 in all: 1 + 1 for the two-stage methods
    assert saved["reports"]["crt"][0]["epochs"] == {"stage1": 1, "stage2": 1}
    assert saved["reports"]["plain"][0]["epochs"] == {"main": 2}
    # the sweep's figures of each run's own open score are the run's open-set figures
    for method in METHODS:
        report = saved["reports"][method][0]
        own = report["open"]["open_score"]
        assert own in DETECTORS
        assert report["detectors"][own]["auroc"] == report["open"]["auroc"]


def test_bench_shares_identical_stages(bench_run):
    out, _ = bench_run
    runs = out / "runs"

    def target(method: str, stage: str) -> Path:
        link = runs / f"{method}-seed0" / stage
        assert link.is_symlink()
        return (link.parent / os.readlink(link)).resolve()

    assert target("plain", "main") == target("tau_norm", "main")
    assert target("crt", "stage1") == target("oltr", "stage1")
    assert target("crt", "stage2") != target("oltr", "stage2")
    # plain/tau_norm main, the shared stage1, crt stage2, oltr stage2: four trainings
    linked = {target(m, s) for m, s in (("plain", "main"), ("crt", "stage1"),
                                        ("crt", "stage2"), ("oltr", "stage2"))}
    assert {p.resolve() for p in (out / "stages").iterdir()} == linked
    for stage_dir in linked:
        assert (stage_dir / DONE).is_file()
    # the cache key of a stage is the one stage_key gives for the method's (rescaled) stage
    config = scale_epochs(load_config("crt", overrides=["seed=0", *bench_module.QUICK_OVERRIDES]),
                          2)
    first = stage_key(stage_config(config, "stage1"), None)
    second = stage_key(stage_config(config, "stage2"), first)
    assert target("crt", "stage1").name == f"stage1-{first}"
    assert target("crt", "stage2").name == f"stage2-{second}"


def test_bench_reports_use_each_methods_own_decision_rule(bench_run):
    _, results = bench_run
    tau_norm = results["reports"]["tau_norm"][0]
    plain = results["reports"]["plain"][0]
    assert tau_norm["tau_normalization_source"].startswith("selected on val")
    assert plain["tau_normalization"] == 0.0 and plain["tau_normalization_source"] == "given"
    assert "selected on val" in results["reports"]["oltr"][0]["logit_adjustment_source"]


def test_bench_report_names_its_method(bench_run):
    """A cached stage shared by plain and tau_norm keeps the config of the run that trained
    it (plain); each run's report still names its own method."""
    _, results = bench_run
    for method in METHODS:
        assert results["reports"][method][0]["method"] == method


def test_second_bench_call_trains_nothing_and_gives_the_same_summary(bench_run, fmnist_small,
                                                                     monkeypatch):
    out, first = bench_run
    folders = sorted(p.name for p in (out / "stages").iterdir())
    done = _stage_state(out)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached stage was trained again")

    monkeypatch.setattr(bench_module, "build_stage", no_training)
    second = _bench(fmnist_small, out)
    assert sorted(p.name for p in (out / "stages").iterdir()) == folders
    assert _stage_state(out) == done
    assert second["summary"] == first["summary"]


def test_bench_run_folders_evaluate_directly(bench_run, fmnist_small):
    out, results = bench_run
    for method in ("plain", "crt", "oltr"):
        report = evaluate_run(out / "runs" / f"{method}-seed0", fmnist_small, open_set=True,
                              detectors=DETECTORS)
        expected = results["reports"][method][0]
        assert report["closed"] == expected["closed"], method
        assert report["open"]["auroc"] == expected["open"]["auroc"], method
        assert report["detectors"]["knn"]["auroc"] == expected["detectors"]["knn"]["auroc"]


def test_tau_norm_run_folder_evaluates_with_its_own_rule(bench_run, fmnist_small):
    """The shared stage's own config.yaml is plain's (no τ-normalisation); evaluating the
    tau_norm run folder must still decide with tau_norm's rule (the run's config.yaml)."""
    out, results = bench_run
    (stage_method,) = [line for line in (out / "runs" / "tau_norm-seed0" / "main" /
                                         "config.yaml").read_text().splitlines()
                       if line.startswith("method:")]
    assert stage_method == "method: plain"
    from oltr.predict import Predictor

    predictor = Predictor.from_run(out / "runs" / "tau_norm-seed0")
    assert predictor.rule.tau_normalization == (
        results["reports"]["tau_norm"][0]["tau_normalization"])
    report = evaluate_run(out / "runs" / "tau_norm-seed0", fmnist_small, open_set=True)
    expected = results["reports"]["tau_norm"][0]
    assert report["tau_normalization_source"] == expected["tau_normalization_source"]
    assert report["closed"] == expected["closed"]


def test_unfinished_shared_stage_is_finished_by_another_method(bench_run, fmnist_small,
                                                               tmp_path):
    out, _ = bench_run
    other = tmp_path / "out"
    (stage,) = [p for p in (out / "stages").iterdir() if p.name.startswith("main-")]
    shutil.copytree(stage, other / "stages" / stage.name)
    (other / "stages" / stage.name / DONE).unlink()  # killed before the stage was recorded
    write_marker(other, "bench")  # a bench oltr started in ``other``
    results = _bench(fmnist_small, other, methods=["tau_norm"])
    assert (other / "stages" / stage.name / DONE).is_file()
    assert results["reports"]["tau_norm"][0]["tau_normalization_source"].startswith("selected")


@pytest.mark.parametrize(("methods", "detectors"), [(["plain", "nope"], ["msp"]),
                                                    (["plain"], ["msp", "nope"]),
                                                    ([], ["msp"])])
def test_unknown_method_or_detector_fails_before_training(fmnist_small, tmp_path, methods,
                                                         detectors):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="nope|at least one method"):
        run_bench(fmnist_small, out, methods=methods, detectors=detectors, seeds=[0], epochs=2,
                  quick=True)
    assert not (out / "stages").exists()
    assert not (out / "runs").exists()


# ------------------------------------------------------------------ 11. command line
def test_bench_and_evaluate_commands(fmnist_small, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    code = main(["bench", "--quick", "--seeds", "0", "--methods", "plain", "--detectors",
                 "msp,energy", "--data", str(fmnist_small), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| plain |" in printed and "| method | msp | energy |" in printed
    assert (out / "results.md").read_text() in printed
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 2 and results["quick"] is True
    assert results["overrides"][:2] == ["model.width=8", "train.max_steps_per_epoch=3"]

    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(1)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(
            noise / f"{index}.png")
    report_path = tmp_path / "report.json"
    code = main(["evaluate", str(out / "runs" / "plain-seed0"), "--data", str(fmnist_small),
                 "--open", "--detector", "energy", "--open-set", f"noise={noise}",
                 "--output", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report["detectors"]) == {"energy"}
    energy = report["detectors"]["energy"]
    printed = capsys.readouterr().out  # each asked detector's figures, on the console too
    assert "detectors (each threshold fitted on val):  F-meas  AUROC  FPR95" in printed
    from oltr.metrics import percent_text
    assert (f"  energy{' ' * 33}{energy['f_measure']:.3f}  {percent_text(energy['auroc']):>5}"
            in printed)
    assert report["open_sets"]["noise"]["num_open"] == 4
    assert report["detectors"]["energy"]["open:noise"]["num_open"] == 4
    # the bench's own report (msp + energy) is left as it was
    bench_report = json.loads((out / "runs" / "plain-seed0" / "report.json").read_text())
    assert set(bench_report["detectors"]) == {"msp", "energy"}
    assert bench_report["detectors"]["energy"]["auroc"] == report["detectors"]["energy"]["auroc"]


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--seeds", "0", "--methods", "plain,nope"], "unknown method 'nope'"),
    (["--seeds", "0", "--detectors", "msp,nope"], "unknown detector"),
    (["--seeds", "0", "--methods", "oltr", "--epochs", "1"], "--epochs must be at least"),
])
def test_bench_command_bad_input_exits_2(fmnist_small, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["bench", "--quick", "--data", str(fmnist_small), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (out / "stages").exists()


def test_bench_over_several_curations_pairs_each_with_its_seed_and_runs_variants(
        fmnist_small, tmp_path, one_thread):
    """The reporting protocol: benchmark i with training seed i; a variant (name, preset,
    overrides) is a method of its own; stages never mix benchmarks in the cache."""
    from oltr.data import curate

    other = tmp_path / "second"
    curate("fashion-mnist", other, seed=1, known=4, open=1, profile="exp", max_count=200,
           min_count=5, val_per_class=5, test_per_class=30)
    out = tmp_path / "out"
    results = run_bench([fmnist_small, other], out,
                        methods=["plain", ("plain, lr 0.05", "plain", ["train.lr=0.05"])],
                        detectors=["msp"], seeds=[3, 4], epochs=1, quick=True)
    assert results["seeds"] == [3, 4] and len(results["data"]) == 2
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted([f"plain-{fmnist_small.name}-seed3", "plain-second-seed4",
                           f"plain__lr_0.05-{fmnist_small.name}-seed3",
                           "plain__lr_0.05-second-seed4"])
    assert len(list((out / "stages").iterdir())) == 4  # 2 configs × 2 benchmarks
    assert [len(runs) for runs in results["reports"].values()] == [2, 2]
    assert results["reports"]["plain, lr 0.05"][0]["method"] == "plain, lr 0.05"
    with pytest.raises(InputError, match="one training seed per benchmark"):
        run_bench([fmnist_small, other], tmp_path / "x", methods=["plain"], seeds=[1])


def test_stage_key_leaves_out_later_keys_at_their_defaults():
    """Keys added after stages were first cached (data.decode, train.feature_cache, …) do not
    enter the key at their defaults: stages cached before them are found again."""
    import hashlib
    import json

    cfg = stage_config(load_config("crt"), "stage2")
    body = {k: v for k, v in cfg.items() if k not in ("method", "eval")}
    body = {k: ({kk: vv for kk, vv in v.items() if kk not in ("decode", "feature_cache",
                                                               "feature_cache_dtype", "compile")}
                if isinstance(v, dict) else v) for k, v in body.items()}
    before = hashlib.sha256(json.dumps({"config": body, "from": "x"}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    assert stage_key(cfg, "x") == before
    assert cfg["train"]["compile"] is False  # the config itself is left as it is
    assert _key("crt", "stage2", "x", ["stage2.train.feature_cache=on"]) != before
    assert _key("crt", "stage2", "x", ["train.compile=true"]) != before


def test_a_detector_that_does_not_apply_is_recorded_and_shown_as_na():
    """ASH needs non-negative features: on features that can be negative it is left out with
    its reason (the bench goes on), and the tables show n/a for it."""
    from types import SimpleNamespace

    from oltr.bench import format_results, summarize
    from oltr.errors import InputError
    from oltr.evaluation.detector_sweep import detector_scores
    from oltr.models import NetworkOutput

    rng = np.random.default_rng(0)

    def split(n: int) -> dict[str, np.ndarray]:
        return {"logits": rng.normal(size=(n, 3)), "features": rng.normal(size=(n, 4)),
                "labels": rng.integers(0, 3, n)}

    class Tiny(torch.nn.Module):  # an OLTRNetwork's head interface: a linear classifier
        def __init__(self) -> None:
            super().__init__()
            self.classifier = torch.nn.Linear(4, 3).double()

        def linear_classifier(self) -> torch.nn.Linear:
            return self.classifier

        def forward_head(self, v: torch.Tensor) -> NetworkOutput:
            return NetworkOutput(self.classifier(v), v)

    outputs = SimpleNamespace(net=Tiny().eval(), centroids=None,
                              splits={"train": split(30), "val": split(6), "test": split(6)})
    with pytest.raises(InputError, match="non-negative"):
        detector_scores(["msp", "ash"], outputs, ["val", "test"])
    inapplicable: dict[str, str] = {}
    scores = detector_scores(["msp", "ash"], outputs, ["val", "test"],
                             inapplicable=inapplicable)
    assert sorted(scores) == ["msp"] and sorted(scores["msp"]) == ["test", "val"]
    assert list(inapplicable) == ["ash"] and "non-negative" in inapplicable["ash"]

    figures = {"detection_error": 0.2, "auroc": 0.8, "fpr95": 0.5, "f_measure": 0.7}
    report = {"closed": dict.fromkeys(("many", "medium", "few", "overall"), 0.5),
              "open": dict.fromkeys(("many", "medium", "few", "f_measure", "detection_error",
                                     "auroc", "fpr95"), 0.5),
              "detectors": {"msp": figures}, "detectors_inapplicable": inapplicable}
    summary = summarize({"oltr": [report]}, ["msp", "ash"])
    assert summary["oltr"]["detectors"]["ash"]["auroc"] == {"mean": None, "std": None, "n": 0}
    table = format_results({"summary": summary, "seeds": [0], "data": "d", "benchmark": "b",
                            "epochs": 2, "machine": "m", "wall_seconds": 1.0,
                            "detectors": ["msp", "ash"]})
    assert "| oltr | 80.0 | n/a |" in table  # one seed: no "± 0.0"


def test_a_failing_method_is_recorded_and_the_others_still_land(fmnist_small, tmp_path, capsys,
                                                                 one_thread):
    """A run that fails (here: a learning rate that makes the loss non-finite) does not cost
    the comparison: it is listed under 'Failed runs' with its error, the other methods are in
    the tables, and the command exits 1."""
    out = tmp_path / "out"
    code = main(["bench", "--quick", "--seeds", "0", "--methods", "plain", "--detectors", "msp",
                 "--data", str(fmnist_small), "--out", str(out), "--no-progress",
                 "--epochs", "1"])
    assert code == 0
    capsys.readouterr()
    results = run_bench(fmnist_small, out, methods=[
        "plain", ("plain, diverging", "plain", ["train.lr=1.0e30", "train.nonfinite=stop"])],
        detectors=["msp"], seeds=[0], epochs=1, quick=True)
    (failure,) = results["failures"]
    assert failure["method"] == "plain, diverging" and failure["seed"] == 0
    assert "non-finite training loss" in failure["error"]
    assert results["summary"]["plain"]["closed"]["overall"]["n"] == 1
    assert results["summary"]["plain, diverging"]["closed"]["overall"]["n"] == 0
    table = (out / "results.md").read_text()
    assert "## Failed runs" in table and "- plain, diverging on" in table
    assert "| plain, diverging | n/a |" in table
    printed = capsys.readouterr()
    assert "FAILED: OltrError: non-finite training loss" in printed.out
    code = main(["bench", "--quick", "--seeds", "0", "--methods", "plain", "--detectors", "msp",
                 "--data", str(fmnist_small), "--out", str(tmp_path / "all"), "--no-progress",
                 "--epochs", "1", "train.lr=1.0e30"])
    printed = capsys.readouterr()
    assert code == 1 and "1 run(s) failed" in printed.err and "## Failed runs" in printed.out
