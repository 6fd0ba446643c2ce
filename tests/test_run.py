"""oltr.run: RunDir and StageDir, the readers and writers of a run's files (no training)."""
from __future__ import annotations

import json

import pytest

from oltr.config import load_config, stage_config
from oltr.errors import InputError
from oltr.run import RunDir, StageDir, final_stage_dir


def _run(tmp_path, method="oltr"):
    """A run folder as training leaves it (no weights): run.json, config.yaml, stage configs."""
    config = load_config(method, overrides=["stage1.train.epochs=2"])
    names = [stage["name"] for stage in config["stages"]]
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.save_config(config)
    run.write_info(config["method"], names, tmp_path / "data")
    for name in names:
        stage = run.stage(name)
        stage.path.mkdir()
        stage.save_config(stage_config(config, name))
    return run, config, names


def test_run_json_names_the_method_stages_and_data_and_progress_is_read_from_the_stages(
        tmp_path):
    run, config, names = _run(tmp_path)
    assert json.loads(run.info_path.read_text()) == {
        "method": config["method"], "stages": names, "final_stage": names[-1],
        "data": str(tmp_path / "data")}
    assert run.data_dir == tmp_path / "data" and run.method == config["method"]
    first = run.stage(names[0])
    first.write_history([{"epoch": 1}])
    assert first.history() == [{"epoch": 1}] and first.progress() == "epoch 1 of 2"
    with pytest.raises(InputError, match=f"'{names[-1]}' has no weights yet .*epoch 1 of 2"):
        run.final_stage()
    assert RunDir(tmp_path / "none").data_dir is None


def test_the_run_s_config_decides_a_shared_stage_and_each_file_is_read_once(tmp_path):
    run, config, names = _run(tmp_path)
    final = run.stage(names[-1])
    (final.path / "model.json").write_text("{}")
    shared = stage_config(config, names[-1])
    other = "max_logit" if config["eval"]["open_score"] != "max_logit" else "energy"
    final.save_config(shared | {"eval": shared["eval"] | {"open_score": other}})
    assert final.config()["eval"]["open_score"] == other
    assert final_stage_dir(run.path) == final.path
    assert run.final_stage().path == final.path
    assert run.stage_config()["eval"]["open_score"] == config["eval"]["open_score"]
    for path in (run.info_path, run.config_path, final.config_path):
        path.unlink()
    assert run.stage_config()["eval"]["open_score"] == config["eval"]["open_score"]
    assert StageDir(final.path).has_model_info() and not StageDir(final.path).has_config()


def test_a_stage_folder_given_as_a_run_is_its_own_final_stage(tmp_path):
    stage = StageDir(tmp_path)
    stage.save_config(stage_config(load_config("plain"), "main"))
    (tmp_path / "model.json").write_text("{}")
    assert RunDir(tmp_path).final_stage().path == tmp_path
    assert RunDir(tmp_path).stage_config() == stage.config()
    with pytest.raises(InputError, match="not an oltr run directory"):
        RunDir(tmp_path / "missing").final_stage()
