"""benchmarks/end_to_end.py: the generated ImageNet-LT-shaped JPEG benchmark, the command lines
of its runs (torchrun's ``-m oltr``), and a CPU smoke run that trains and writes one table."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "end_to_end.py"


def test_generated_benchmark_has_the_published_layout_and_is_reused(tmp_path,
                                                                   benchmark_script):
    e2e = benchmark_script("end_to_end")
    data = tmp_path / "data"
    first = e2e.make_dataset(data, 6, classes=3, workers=1)
    lines = {split: (data / f"ImageNet_LT_{split}.txt").read_text().splitlines()
             for split in ("train", "val", "test", "open")}
    assert len(lines["train"]) == 6 and len(lines["val"]) == len(lines["test"]) == 6
    assert lines["train"][4] == "train/n00000001/n00000001_4.JPEG 1"
    assert all(line.endswith(" -1") for line in lines["open"])
    assert (data / "images" / "train" / "n00000001" / "n00000001_4.JPEG").exists()
    assert (data / "ImageNet_LT_open" / "open_0.JPEG").exists()
    assert first["mean_file_kib"] > 1
    assert e2e.make_dataset(data, 6, classes=3, workers=1) == first  # reused, not rewritten
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("the user's")
    with pytest.raises(ValueError, match="another --data"):
        e2e.make_dataset(other, 6, classes=3, workers=1)
    assert (other / "keep.txt").read_text() == "the user's"


def test_run_commands(benchmark_script):
    e2e = benchmark_script("end_to_end")
    args = argparse.Namespace(epochs=3, workers=15, data=Path("d"), device="cuda", batch=256)
    ddp = e2e.train_command("ddp", args, Path("o"), gpus=4)
    assert ddp[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert ddp[5:8] == ["-m", "oltr", "train"]  # torchrun runs the module, as the README says
    assert "data.num_workers=3" in ddp and "data.decode=device" in ddp
    cpu = e2e.train_command("cpu", args, Path("o"), gpus=4)
    assert "data.decode=cpu" in cpu and "data.num_workers=15" in cpu
    stage2 = e2e.train_command("stage2", args, Path("o"), gpus=1)
    assert "oltr" in stage2 and "stage2.train.epochs=3" in stage2


def test_cpu_smoke_run_trains_and_writes_one_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--images", "16", "--classes", "2",
         "--epochs", "1", "--batch", "8", "--workers", "1", "--runs", "decode", "loader-cpu", "cpu",
         "--data", str(tmp_path / "data"), "--work", str(tmp_path / "runs"),
         "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "end-to-end-cpu.json").read_text())
    assert [row["run"] for row in saved["rows"]] == ["decode", "transform", "loader-cpu", "cpu"]
    assert all(row["exit"] == 0 and row["per_second"] > 0 for row in saved["rows"])
    table = (tmp_path / "out" / "end-to-end-cpu.md").read_text()
    assert table in result.stdout and "Pillow decoding in 1 worker processes" in table
