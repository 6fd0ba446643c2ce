"""benchmarks/fmnist_lt_oltr.py's protocols: the development protocol never touches a reporting
curation, whatever training seeds it is given (choices are made on its val only)."""
from __future__ import annotations

from pathlib import Path


def test_development_seeds_are_training_seeds_on_the_development_curation(
        tmp_path, monkeypatch, benchmark_script):
    bench = benchmark_script("fmnist_lt_oltr")
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
