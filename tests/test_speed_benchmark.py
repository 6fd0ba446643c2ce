"""benchmarks/speed.py: the --quick smoke run writes one table with every case and ratio; the
original code's hard-coded .cuda() calls are redirected without touching its files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_quick_run_prints_and_writes_one_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=240,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "speed-cpu-quick.json").read_text())
    assert result.stdout.startswith(f"Machine: {saved['machine']}")
    assert "torch" in saved["machine"] and saved["quick"] is True
    cases = {(row["case"].split(" (")[0].split(" [")[0], row["size"]) for row in saved["rows"]}
    for size in ("imagenet_lt", "fmnist_lt"):
        for case in ("train stage 1", "train stage 2", "frozen-backbone epoch on images",
                     "frozen-backbone epoch on cached rows", "inference"):
            assert (case, size) in cases, (case, size)
    assert ("stage-2 head, oltr", "head") in cases
    assert all(row["per_second"] > 0 for row in saved["rows"])
    assert all(row["peak_mib"] is None or row["peak_mib"] >= 0 for row in saved["rows"])
    comparisons = [ratio["comparison"] for ratio in saved["ratios"]]
    assert any(c.startswith("stage-2 head") for c in comparisons)
    assert sum("cached rows vs images" in c for c in comparisons) == 3
    assert any("backbone alone" in c for c in comparisons)
    assert all(ratio["speed_ratio"] > 0 for ratio in saved["ratios"])
    table = (tmp_path / "speed-cpu-quick.md").read_text()
    assert table in result.stdout and "| comparison (A vs B) | speed ratio (A ÷ B, img/s) |" in table


FAKE_ORIGINAL = {
    "utils.py": "import torch\n",
    "models/ResNetFeature.py": "",
    "models/ResNet10Feature.py": "",
    "models/DotProductClassifier.py": "",
    "models/MetaEmbeddingClassifier.py": "from models.CosNormClassifier import CosNorm_Classifier\n",
    "models/CosNormClassifier.py": (
        "import torch\nfrom torch import nn\nfrom utils import *\n"
        "class CosNorm_Classifier(nn.Module):\n"
        "    def __init__(self, i, o):\n"
        "        super().__init__()\n"
        "        self.weight = nn.Parameter(torch.Tensor(o, i).cuda())\n"),
    "layers/ModulatedAttLayer.py": "",
    "loss/DiscCentroidsLoss.py": (
        "import torch\nfrom torch import nn\n"
        "class DiscCentroidsLoss(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x + torch.arange(x.shape[0]).long().cuda()\n"),
    "loss/SoftmaxLoss.py": "",
}


def test_the_originals_cuda_calls_go_to_the_chosen_device(tmp_path, benchmark_script):
    for name, text in FAKE_ORIGINAL.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = {name for name in sys.modules if name.split(".")[0] in ("utils", "models",
                                                                       "layers", "loss")}
    speed = benchmark_script("speed")
    modules = speed.import_original(tmp_path, torch.device("cpu"))
    classifier = modules["models.CosNormClassifier"].CosNorm_Classifier(3, 2)
    assert classifier.weight.device.type == "cpu"
    loss = modules["loss.DiscCentroidsLoss"].DiscCentroidsLoss()
    assert loss(torch.zeros(3)).tolist() == [0.0, 1.0, 2.0]
    assert torch.Tensor.cuda.__qualname__ == "TensorBase.cuda"  # restored after each call
    after = {name for name in sys.modules if name.split(".")[0] in ("utils", "models",
                                                                      "layers", "loss")}
    assert after == before  # its top-level names do not stay importable
    assert (tmp_path / "models" / "CosNormClassifier.py").read_text() == FAKE_ORIGINAL[
        "models/CosNormClassifier.py"]
