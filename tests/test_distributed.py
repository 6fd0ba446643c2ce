"""Distributed training under torchrun (DDP, gloo on the CPU): two processes train both stages of
OLTR, and a single process trains the same global batch for comparison."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oltr.config import load_config, stage_config
from oltr.data import dataset_for, load_benchmark
from oltr.inference import EvalBatches, collect_outputs, load_model
from oltr.pipeline import train_run
from oltr.run import read_history

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
TINY = ["model.width=8", "train.batch_size=32", "train.max_steps_per_epoch=3",
        "eval.batch_size=256", "device=cpu", "data.num_workers=0"]


def torchrun(log_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(WORKER), str(log_dir), *args]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ranks_draw_disjoint_shares_of_one_stream(fmnist_small, tmp_path):
    torchrun(tmp_path, "loaders", str(fmnist_small))
    streams = [json.loads((tmp_path / f"stream-{rank}.json").read_text()) for rank in (0, 1)]
    for sampler in ("instance", "class_aware"):
        positions = [set(s[sampler]["positions"]) for s in streams]
        assert not positions[0] & positions[1]  # disjoint
        assert len(positions[0]) == len(positions[1])
        # together they are the stream one process draws
        order = {}
        for s in streams:
            order |= dict(zip(s[sampler]["positions"], s[sampler]["indices"]))
        assert sorted(order) == list(range(len(order)))


def test_two_processes_train_both_stages_and_only_rank_0_writes(fmnist_small, tmp_path, one_thread):
    run = tmp_path / "ddp"
    overrides = [*TINY, "stage1.train.epochs=2", "stage2.train.epochs=0"]
    torchrun(tmp_path, "train", "--method", "oltr", "--data", str(fmnist_small), "--out", str(run),
             "--no-progress", *overrides)
    writes = {rank: (tmp_path / f"writes-{rank}.txt").read_text().split() for rank in (0, 1)}
    assert any(w.endswith("model.safetensors") for w in writes[0])
    assert any(w.endswith("decision.json") for w in writes[0])
    assert not [w for w in writes[1] if str(run) in w]  # rank 1 wrote nothing of the run
    # centroids after initialisation = the single-process class means of stage 1's features
    net, _ = load_model(run / "stage2")
    config = load_config("oltr", overrides=overrides)
    cfg = stage_config(config, "stage2")
    bench = load_benchmark(fmnist_small)
    outputs = collect_outputs(net, EvalBatches(dataset_for(bench, "train", cfg["data"],
                                                           train=False), cfg["data"],
                                               batch_size=256), torch.device("cpu"))
    expected = np.stack([outputs["features"][outputs["labels"] == k].mean(axis=0)
                         for k in range(bench.num_classes)])
    assert np.allclose(net.meta_embedding.centroids.detach().numpy(), expected, atol=1e-4)


def test_ddp_metrics_match_one_process_of_the_same_global_batch(fmnist_small, tmp_path,
                                                                  one_thread):
    """Same seed, same global batch (2 × 16 vs 1 × 32), same samples per step: the runs differ
    only in BatchNorm statistics (per process of 16 images vs over 32; SyncBatchNorm is
    CUDA-only), so their losses and accuracies agree within a stated tolerance: train loss
    within 10 % relative, val accuracy within 10 points, after 2 epochs × 3 steps."""
    overrides = [*TINY, "train.epochs=2", "deterministic=true"]
    torchrun(tmp_path, "train", "--method", "plain", "--data", str(fmnist_small), "--out",
             str(tmp_path / "ddp"), "--no-progress", *overrides)
    train_run(load_config("plain", overrides=overrides), fmnist_small, tmp_path / "one",
              progress=False)
    ddp, one = (read_history(tmp_path / name / "main") for name in ("ddp", "one"))
    for a, b in zip(ddp, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.10)
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 0.10


def test_ddp_feature_cache_written_by_rank_0_and_same_weights_as_one_process(
        fmnist_small, tmp_path, one_thread):
    """cRT stage 2 on the frozen-backbone feature cache: rank 0 alone writes the cache, both
    ranks read their shares of its rows, and since the backbone and its BatchNorm are frozen,
    2 processes × 16 rows compute the mean gradient of 1 process × 32 rows: the weights agree
    to float tolerance (1e-5)."""
    base = tmp_path / "base"
    overrides = [*TINY, "stage1.train.epochs=1", "stage2.train.epochs=2",
                 "stage2.train.feature_cache=on"]
    train_run(load_config("crt", overrides=overrides), fmnist_small, base, progress=False,
              stages=["stage1"], fit_decision=False)
    stage2 = [*overrides, f"stage2.train.init_from={base / 'stage1'}"]
    torchrun(tmp_path, "train", "--method", "crt", "--data", str(fmnist_small), "--out",
             str(tmp_path / "ddp"), "--stage", "stage2", "--no-progress", *stage2)
    train_run(load_config("crt", overrides=stage2), fmnist_small, tmp_path / "one",
              progress=False, stages=["stage2"])
    writes = {rank: (tmp_path / f"writes-{rank}.txt").read_text().split() for rank in (0, 1)}
    assert [w for w in writes[0] if "features-train-" in w and w.endswith(".npy")]
    assert not [w for w in writes[1] if "features-" in w]
    ddp, one = (torch.load(tmp_path / name / "stage2" / "checkpoint.pt",
                           weights_only=True)["model"] for name in ("ddp", "one"))
    for key, value in one.items():
        assert torch.allclose(ddp[key].float(), value.float(), atol=1e-5), key


def test_the_readme_launch_torchrun_m_oltr_train(fmnist_small, tmp_path):
    """The README's command form, ``torchrun --nproc_per_node N -m oltr train …`` (python -m
    oltr needs ``oltr/__main__.py``): two processes train one short epoch and rank 0 writes the
    run's history."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "oltr", "train", "--method", "plain",
               "--data", str(fmnist_small), "--out", str(tmp_path / "run"), "--no-progress",
               *TINY, "train.epochs=1"]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(read_history(tmp_path / "run" / "main")) == 1
