"""Shared fixtures: a small real Fashion-MNIST-LT benchmark curated once per test session."""
from __future__ import annotations

import importlib.util
import os
import sys

# The CPU kernels' instruction set, pinned before torch loads them (and inherited by the CLI
# subprocesses tests start): oneDNN's and MKL's AVX-512 kernels block a matrix product by its
# batch size, so a backbone run on batches of 32 and of 256 rounds differently and the
# "cached equals uncached" / "DDP equals one process" checks (tests/test_features.py,
# tests/test_distributed.py) drifted by 1e-4 after six steps on an AVX-512 machine while
# they agree to 0 on AVX2. With AVX2 kernels everywhere the suite's numbers are the same on
# every x86-64 CPU this project's CI may get (docs/architecture.md, "Tests").
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
from pathlib import Path
from types import ModuleType

import pytest
import torch

from oltr.data import curate
from oltr.data.sources import FASHION_MNIST_SYSTEM_DIR

# A tiny network and a few steps: the smoke tests check plumbing on real data, not accuracy.
TINY_OVERRIDES = ["model.width=8", "train.batch_size=32", "train.max_steps_per_epoch=3",
        "eval.batch_size=256", "train.log_every=1"]


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 known classes (200 → 5, exp), 1 open class, 30 test images per class."""
    if not FASHION_MNIST_SYSTEM_DIR.exists():
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("bench") / "fmnist-small"
    curate("fashion-mnist", out, seed=0, known=4, open=1, profile="exp", max_count=200,
           min_count=5, val_per_class=5, test_per_class=30)
    return out


@pytest.fixture
def tiny() -> list[str]:
    """Config overrides for smoke runs: width-8 ResNet, batch 32, 3 steps per epoch."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine extra threads only contend, and runs
    compared for equal weights must use the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def benchmark_script():
    """``load(name)`` imports ``benchmarks/<name>.py`` as a module (the scripts are not a
    package; registered in ``sys.modules``, where their dataclasses look their module up)."""
    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return load
