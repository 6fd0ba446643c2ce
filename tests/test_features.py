"""The frozen-backbone feature cache (oltr.features): the split point, cached = uncached
training without augmentation, the cache key, float16 storage, the config checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oltr import artifact
from oltr.config import load_config, stage_config
from oltr.data import load_benchmark
from oltr.errors import InputError
from oltr.features import FeatureStore, cache_key, frozen_state_digest, store_outputs
from oltr.models import create_network
from oltr.pipeline import train_run
from oltr.run import read_history
from oltr.runtime import Runtime

#: No augmentation on either path (data.transform: none), so the two must agree.
NO_AUGMENT = ["data.transform=none", "model.width=8", "train.batch_size=32",
              "train.max_steps_per_epoch=3", "eval.batch_size=256", "device=cpu"]


@pytest.mark.parametrize("options", [
    {},                                                   # cRT: pooled split, linear head
    {"embed_dim": 16},                                    # the embedding stays trainable
    {"attention": True, "meta_embedding": True, "classifier": "cosine", "embed_dim": 16},
])
def test_forward_from_frozen_is_forward(options):
    torch.manual_seed(0)
    net = create_network({"backbone": "resnet10_small", "width": 8, **options}, 5, 1).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        frozen = net.frozen_features(x)
        expected, got = net(x), net.forward_from_frozen(frozen)
    assert net.frozen_split == ("feature_map" if options.get("attention") else "pooled")
    assert frozen.shape == ((4, 64, 4, 4) if options.get("attention") else (4, 64))
    for key in ("logits", "features"):
        assert torch.equal(getattr(expected, key), getattr(got, key)), key


def _stage_pair(fmnist_small, tmp_path, method, extra):
    """Stage 1 once, then stage 2 trained from it without and with the cache."""
    base = tmp_path / "base"
    overrides = [*NO_AUGMENT, "stage1.train.epochs=1", "stage2.train.epochs=2", *extra]
    train_run(load_config(method, overrides=overrides), fmnist_small, base, progress=False,
              stages=["stage1"], fit_decision=False)
    runs = {}
    for cache in ("off", "on"):
        run = tmp_path / cache
        config = load_config(method, overrides=[
            *overrides, f"stage2.train.feature_cache={cache}",
            f"stage2.train.init_from={base / 'stage1'}"])
        train_run(config, fmnist_small, run, progress=False, stages=["stage2"],
                  fit_decision=False)
        runs[cache] = run
    return runs


def _assert_same_training(runs, atol):
    off, on = (torch.load(runs[c] / "stage2" / "checkpoint.pt", weights_only=True)["model"]
               for c in ("off", "on"))
    assert off.keys() == on.keys()
    for key in off:
        assert torch.allclose(off[key].float(), on[key].float(), atol=atol, rtol=0), key
    for a, b in zip(read_history(runs["off"] / "stage2"), read_history(runs["on"] / "stage2")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]


def test_contiguous_after_split_changes_the_attention_layout_only():
    """Cached feature-map rows are contiguous: the trainable modules after the split go to the
    contiguous format (no per-conv layout conversion), the frozen backbone keeps channels-last,
    and the outputs do not change."""
    torch.manual_seed(0)
    net = create_network({"backbone": "resnet10_small", "width": 8, "attention": True,
                          "meta_embedding": True, "classifier": "cosine", "embed_dim": 16},
                         5, 1).eval().to(memory_format=torch.channels_last)
    rows = net.frozen_features(torch.randn(4, 1, 28, 28)).detach().contiguous()
    with torch.no_grad():
        before = net.forward_from_frozen(rows).logits
        assert net.contiguous_after_split() is net
        after = net.forward_from_frozen(rows).logits
    convs = lambda module: [m.weight for m in module.modules()
                            if isinstance(m, torch.nn.Conv2d)]
    default_strides = lambda w: torch.empty(w.shape).stride()
    assert convs(net.attention)
    assert all(w.stride() == default_strides(w) for w in convs(net.attention))
    assert all(w.stride() != default_strides(w) for w in convs(net.backbone) if w.shape[1] > 1)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_crt_cached_equals_uncached_without_augmentation(fmnist_small, tmp_path, one_thread,
                                                         monkeypatch):
    """cRT (pooled split point): 2 epochs × 3 steps give the same weights with and without
    the cache, to float tolerance (measured max difference: 0, the same operations; LWS and
    FSLwF measured 0 too)."""
    runs = _stage_pair(fmnist_small, tmp_path, "crt", [])
    _assert_same_training(runs, atol=1e-6)
    cached = sorted(p.name for p in (runs["on"] / "stage2").glob("features-*"))
    assert [name.split("-")[1] for name in cached] == ["train", "train", "val", "val"]
    assert not list((runs["off"] / "stage2").glob("features-*"))
    # the decision rule is fitted from the cached val rows: the same rule
    calls = []
    monkeypatch.setattr(artifact, "store_outputs",
                        lambda *a, **k: calls.append(a[1].path.name) or store_outputs(*a, **k))
    rules = {cache: artifact.fit_decision(runs[cache], fmnist_small) for cache in ("off", "on")}
    # val for the threshold, train for the default open score (knn, which learns on train)
    assert sorted(name.split("-")[1] for name in calls) == ["train", "val"]
    assert all((runs["on"] / "stage2" / name).is_file() for name in calls)
    assert rules["on"].threshold == pytest.approx(rules["off"].threshold, rel=1e-6)
    assert rules["on"].open_score == rules["off"].open_score


def test_frozen_oltr_cached_equals_uncached(fmnist_small, tmp_path, one_thread):
    """OLTR stage 2 with a frozen backbone (Places-LT's protocol; feature-map split point,
    attention trainable): centroids initialised from the cached rows, then 2 epochs; the
    weights agree to 1e-5 (measured: 1.2e-7; the cached map is NCHW, the live one
    channels-last, so attention's convolutions may sum in another order)."""
    runs = _stage_pair(fmnist_small, tmp_path, "oltr", ["stage2.train.freeze_backbone=true"])
    _assert_same_training(runs, atol=1e-5)
    info = json.loads(next((runs["on"] / "stage2").glob("features-train-*.json")).read_text())
    assert info["split_point"] == "feature_map" and info["shape"][1:] == [64, 4, 4]


def test_cache_key_and_stale_caches(fmnist_small, tmp_path):
    bench = load_benchmark(fmnist_small)
    cfg = stage_config(load_config("crt", overrides=[*NO_AUGMENT, "stage2.train.feature_cache=on"]),
                       "stage2")
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    (stage_dir / ".oltr").write_text(json.dumps({"written_by": "oltr", "kind": "stage"}))
    runtime = Runtime(torch.device("cpu"))
    torch.manual_seed(0)
    net = create_network(cfg["model"], bench.num_classes, 1)
    store = FeatureStore.build(stage_dir, net, bench, "val", cfg, runtime, progress=False)
    assert store.rows.shape == (len(bench.split("val")), 64) and store.rows.dtype == np.float32
    assert isinstance(store.rows, np.memmap)
    key = cache_key(net, bench, "val", cfg, runtime.device)
    assert store.key == key and store.path.name == f"features-val-{key[:16]}.npy"
    # the same weights, settings and split: the same key; any change: another key
    assert cache_key(net, bench, "train", cfg, runtime.device) != key
    other = stage_config(load_config("crt", overrides=[*NO_AUGMENT, "data.mean=[0.5]",
                                                       "stage2.train.feature_cache=on"]), "stage2")
    assert cache_key(net, bench, "val", other, runtime.device) != key
    digest = frozen_state_digest(net.backbone)
    with torch.no_grad():
        net.backbone.bn1.running_mean += 1e-3  # statistics count as weights
    assert frozen_state_digest(net.backbone) != digest
    new_key = cache_key(net, bench, "val", cfg, runtime.device)
    assert new_key != key
    assert FeatureStore.find(stage_dir, "val", new_key, store.labels.numpy()) is None
    fresh = FeatureStore.build(stage_dir, net, bench, "val", cfg, runtime, progress=False)
    assert not np.array_equal(np.asarray(fresh.rows), np.asarray(store.rows))
    # the stale cache is gone; the new one holds the new weights' features
    assert sorted(p.name for p in stage_dir.glob("features-*")) == sorted(
        [fresh.path.name, fresh.path.with_suffix(".json").name])
    # a damaged description is never trusted: the cache is built again
    fresh.path.with_suffix(".json").write_text("{")
    assert FeatureStore.find(stage_dir, "val", new_key, store.labels.numpy()) is None


def test_float16_cache_rounds_within_half_precision(fmnist_small, tmp_path):
    bench = load_benchmark(fmnist_small)
    runtime = Runtime(torch.device("cpu"))
    stores = {}
    for dtype in ("float32", "float16"):
        cfg = stage_config(load_config("crt", overrides=[
            *NO_AUGMENT, "stage2.train.feature_cache=on", f"train.feature_cache_dtype={dtype}"]),
            "stage2")
        torch.manual_seed(0)
        net = create_network(cfg["model"], bench.num_classes, 1)
        (tmp_path / dtype).mkdir()
        stores[dtype] = FeatureStore.build(tmp_path / dtype, net, bench, "val", cfg, runtime,
                                           progress=False)
    exact = np.asarray(stores["float32"].rows)
    half = stores["float16"].take(np.arange(len(exact))).numpy()
    assert stores["float16"].rows.dtype == np.float16
    assert np.allclose(half, exact, rtol=2**-11, atol=1e-7)
    # a feature beyond float16's range: one error naming the key and the way to keep stage 1,
    # and no numpy overflow warning before it
    with torch.no_grad():
        net.backbone.bn1.weight.mul_(1e6)
    (tmp_path / "run" / "stage2").mkdir(parents=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match=r"exceeds float16's range.*stage2\.train\."
                                             r"feature_cache_dtype=float32.*--stage stage2 "
                                             r"stage2\.train\.init_from="):
            FeatureStore.build(tmp_path / "run" / "stage2", net, bench, "val", cfg, runtime,
                               progress=False)


def test_feature_cache_needs_a_frozen_backbone():
    with pytest.raises(InputError, match="train.feature_cache.*freeze_backbone"):
        load_config("oltr", overrides=["stage2.train.feature_cache=on"])
    config = load_config("crt", overrides=["stage2.train.feature_cache=on"])
    assert stage_config(config, "stage2")["train"]["feature_cache"] == "on"
    assert stage_config(config, "stage1")["train"]["feature_cache"] == "off"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crt_cached_equals_uncached_on_a_gpu(fmnist_small, tmp_path):
    """As on the CPU, with train.amp off (bf16 autocast would run the live backbone in bf16,
    while the cache holds its fp32 outputs, eval.amp)."""
    runs = _stage_pair(fmnist_small, tmp_path, "crt", ["device=cuda", "train.amp=off"])
    _assert_same_training(runs, atol=1e-4)


def test_resume_on_the_cache_matches_uninterrupted(fmnist_small, tmp_path, one_thread):
    """A cRT stage 2 on the cache killed in its second epoch and resumed reads the same cache
    (not written again) and ends with the weights of an uninterrupted run."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    base = tmp_path / "base"
    overrides = [*NO_AUGMENT, "stage1.train.epochs=1", "stage2.train.epochs=3",
                 "stage2.train.feature_cache=on", "deterministic=true"]
    train_run(load_config("crt", overrides=overrides), fmnist_small, base, progress=False,
              stages=["stage1"], fit_decision=False)
    config = load_config("crt", overrides=[*overrides,
                                           f"stage2.train.init_from={base / 'stage1'}"])
    train_run(config, fmnist_small, tmp_path / "reference", progress=False, stages=["stage2"],
              fit_decision=False)
    crashed = tmp_path / "crashed"

    def crash_in_second_epoch(*_args):  # before every optimiser step
        if (crashed / "stage2" / "checkpoint.pt").exists():  # epoch 1 is done
            raise KeyboardInterrupt

    hook = register_optimizer_step_pre_hook(crash_in_second_epoch)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_run(config, fmnist_small, crashed, progress=False, stages=["stage2"],
                      fit_decision=False)
    finally:
        hook.remove()
    cache = next((crashed / "stage2").glob("features-train-*.npy"))
    written = cache.stat().st_mtime_ns
    train_run(config, fmnist_small, crashed, progress=False, stages=["stage2"], resume=True,
              fit_decision=False)
    assert cache.stat().st_mtime_ns == written
    final, expected = (torch.load(run / "stage2" / "checkpoint.pt", weights_only=True)["model"]
                       for run in (crashed, tmp_path / "reference"))
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
