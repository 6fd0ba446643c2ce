"""benchmarks/fmnist_lt_oltr.py's protocols: the development protocol never touches a reporting
curation, whatever training seeds it is given (choices are made on its val only)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fmnist_lt_oltr.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fmnist_lt_oltr_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_development_seeds_are_training_seeds_on_the_development_curation(tmp_path,
                                                                           monkeypatch):
    bench = load_script()
    curated = []

    def fake_curate(source, path, **settings):
        curated.append((Path(path).name, settings["seed"]))
        Path(path).mkdir(parents=True)
        (Path(path) / "manifest.json").write_text("{}")

    monkeypatch.setattr(bench, "curate", fake_curate)
    assert bench.curations("development", [0, 1, 2], tmp_path) == [tmp_path / "fmnist-lt"]
    assert curated == [("fmnist-lt", 0)]
    assert bench.curations("reporting", [1, 2, 3], tmp_path) == [
        tmp_path / f"fmnist-lt-s{seed}" for seed in (1, 2, 3)]
    assert curated[1:] == [(f"fmnist-lt-s{seed}", seed) for seed in (1, 2, 3)]
