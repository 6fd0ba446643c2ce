"""train.compile: the training step through torch.compile; what is saved is the plain module."""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from oltr.config import load_config
from oltr.pipeline import train_run
from oltr.run import read_history
from oltr.train.checkpoint import unwrap_model


def test_unwrap_model_takes_compile_off():
    net = torch.nn.Linear(3, 2)
    assert unwrap_model(torch.compile(net)) is net


def test_compiled_training_saves_plain_weights(fmnist_small, tiny, tmp_path, monkeypatch,
                                               one_thread):
    """A tiny plain run with ``train.compile: true`` trains like the eager one and saves the
    same state-dict names (no ``_orig_mod.`` prefix). torch.compile runs with the
    ``aot_eager`` backend here: TorchDynamo and AOTAutograd trace the same step graph, but
    inductor's C++ code generation, the default backend, takes ~90 s for this tiny network
    on the 2-core test CPU (measured); the default backend is what ``oltr train`` uses."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    histories, weights = {}, {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        config = load_config("plain", overrides=[*tiny, "train.epochs=2", "device=cpu",
                                                 f"train.compile={str(compiled).lower()}"])
        train_run(config, fmnist_small, run, progress=False, fit_decision=False)
        histories[compiled] = read_history(run / "main")
        weights[compiled] = load_file(str(run / "main" / "model.safetensors"))
        checkpoint = torch.load(run / "main" / "checkpoint.pt", weights_only=True)["model"]
        assert not [key for key in checkpoint if "_orig_mod" in key]
    assert weights[True].keys() == weights[False].keys()
    for eager, compiled in zip(histories[False], histories[True]):
        assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
