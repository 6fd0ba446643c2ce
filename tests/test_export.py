"""ONNX export (oltr.export): the network and its decision rule as one graph, checked against
PyTorch with ONNX Runtime.

Tolerance (stated in oltr.export: ATOL = RTOL = 1e-4, fp32 input): |onnx − torch| <=
1e-4 + 1e-4·|torch| for the decision logits, the open score and the confidence; predictions
identical except where the open score is within that tolerance of the threshold, or the top
two decision logits are within it of each other (neither happens on these inputs). The
reference is the PyTorch decision path itself — ``DecisionRule.apply`` on ``net(x)`` — not the
export module. Measured differences are ~1e-6 or less (printed with ``pytest -s``).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from oltr.cli import export as export_command
from oltr.decision import SplitOutputs, fit_decision_rule
from oltr.detectors import LinearHead, create_detector, list_detectors, network_head
from oltr.errors import InputError
from oltr.export import (
    ATOL,
    OUTPUT_NAMES,
    RTOL,
    ExportModule,
    check_output_file,
    closed_set_rule,
    euclidean_distances,
    export_onnx,
)
from oltr.models import create_network
from oltr.run import weights_digest

torch.set_num_threads(1)

SMALL = {"backbone": "resnet10_small", "width": 8}  # 64-d features
STAGE2 = {**SMALL, "classifier": "cosine", "attention": True, "meta_embedding": True}
DATA = {"image_size": 16, "channels": 1, "mean": [0.2860], "std": [0.3530],
        "transform": "small"}
CLASSES = ["t-shirt", "trouser", "pullover", "dress"]
COUNTS = [40, 20, 10, 5]


# --------------------------------------------------------------------------- helpers
def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _network(cfg: dict) -> torch.nn.Module:
    """A tiny network in the state of a trained one: BatchNorm statistics that are not the
    identity, modulated attention that adds context (its output conv is zero at init), the
    memory initialised with class means (paper §3.1), as training leaves them."""
    torch.manual_seed(0)
    net = create_network(cfg, len(CLASSES), 1)
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    if net.attention is not None:
        torch.nn.init.normal_(net.attention.self_attention.out.weight, std=0.2)
    net.eval()
    if net.meta_embedding is not None:
        with torch.no_grad():
            v = net.pool(net.forward_features(_images(40, 2)))
        labels = torch.arange(40) % len(CLASSES)
        net.meta_embedding.init_centroids(
            torch.stack([v[labels == k].mean(dim=0) for k in range(len(CLASSES))]))
    return net


def _outputs(net: torch.nn.Module, n: int, seed: int) -> SplitOutputs:
    with torch.no_grad():
        out = net(_images(n, seed))
    return SplitOutputs(out.logits, out.features, torch.arange(n) % len(CLASSES))


def _rule(net: torch.nn.Module, open_score: str, tau: float, adjustment: float):
    """A rule fitted on the network's outputs; the threshold accepts half of val, so about
    half of random test inputs are answered "unknown"."""
    linear = net.meta_embedding is None
    return fit_decision_rule(
        {"open_score": open_score, "tau_normalization": tau, "logit_adjustment": adjustment,
         "accept_rate": 0.5},
        {"train": _outputs(net, 40, 3), "val": _outputs(net, 24, 4)},
        class_names=CLASSES, train_counts=COUNTS,
        classifier=net.classifier if linear else None, head=network_head(net))


def _torch_reference(net, rule, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The PyTorch decision path: DecisionRule.apply on the network's outputs."""
    with torch.no_grad():
        out = net(images)
        applied = rule.apply(out.logits, out.features, classifier=net.classifier,
                             head=network_head(net))
    logits = applied["logits"]
    return {"logits": logits.numpy(), "open_score": applied["open_score"].numpy(),
            "prediction": applied["prediction"].numpy(),
            "confidence": torch.softmax(logits, dim=1).max(dim=1).values.numpy()}


def _run_onnx(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"input": images.numpy()})))


def _assert_parity(got: dict, expected: dict, threshold: float | None, label: str) -> None:
    assert got["logits"].dtype == np.float32 and got["confidence"].dtype == np.float32
    assert got["open_score"].dtype == np.float64 and got["prediction"].dtype == np.int64
    differences = {}
    for name in ("logits", "open_score", "confidence"):
        assert got[name].shape == expected[name].shape, name
        np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{label}: {name}")
        differences[name] = float(np.abs(got[name].astype(np.float64) - expected[name]).max())
    differ = got["prediction"] != expected["prediction"]
    if threshold is not None:
        near = np.abs(expected["open_score"] - threshold) <= ATOL + RTOL * abs(threshold)
        differ &= ~near
    assert not differ.any(), f"{label}: predictions differ"
    print(f"\n{label}: max |onnxruntime - torch| {differences}")


def _export(tmp_path_factory, net, rule, name: str, **kwargs) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
    result = export_onnx(net, rule, path, data=DATA, **kwargs)
    assert result.path == path and result.differences  # verified with onnxruntime
    return path


# --------------------------------------------------------------------------- no ONNX needed
def test_euclidean_distances_match_cdist():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=generator) * 3
    b = torch.cat([a[:2], torch.randn(4, 5, generator=generator)])  # two zero distances
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x, y = a.to(dtype), b.to(dtype)
        got = euclidean_distances(x, y)
        expected = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
        assert got.dtype == dtype and torch.allclose(got, expected, atol=tolerance, rtol=0)
        assert got[0, 0] == 0 and got[1, 1] == 0
    batched = torch.randn(2, 3, 4, generator=generator)
    assert torch.allclose(euclidean_distances(batched, batched[:, :2]),
                          torch.cdist(batched, batched[:, :2]), atol=1e-5)
    with pytest.raises(InputError, match="p = 2 only"):
        euclidean_distances(a, b, p=1.0)


def _detector_data():
    """Non-negative features (activations after a ReLU) of 3 classes, a linear head."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    features = (torch.eye(3, 6, dtype=torch.float64)[labels] * 4
                + torch.rand(60, 6, generator=generator, dtype=torch.float64))
    head = LinearHead(torch.randn(3, 6, generator=generator, dtype=torch.float64),
                      torch.randn(3, generator=generator, dtype=torch.float64))
    test = torch.rand(9, 6, generator=generator, dtype=torch.float64) * 5
    return features, labels, head, test


@pytest.mark.parametrize("name", list_detectors())
def test_traceable_score_is_the_score_of_every_detector(name):
    """One formula per detector: the torch-only path ONNX export traces gives score()'s
    values (ODIN with input perturbation is refused, and says why)."""
    features, labels, head, test = _detector_data()
    options = {"openmax": {"alpha": 2, "tail_size": 5}, "odin": {"temperature": 10.0}}
    detector = create_detector(name, **options.get(name, {}))
    detector.fit(features=features, logits=head(features), labels=labels, head=head)
    inputs = {"logits": head(test), "features": test, "head": head}
    assert detector.export_refusal() is None
    traced = detector.traceable_score(**inputs)
    assert isinstance(traced, torch.Tensor) and traced.shape == (9,)
    np.testing.assert_allclose(traced.double().numpy(), detector.score(**inputs),
                               rtol=1e-12, atol=1e-12)
    if name == "odin":
        perturbing = create_detector("odin", epsilon=0.002)
        assert "gradient" in perturbing.export_refusal()
        with pytest.raises(InputError, match="'odin' cannot be exported: .*gradient"):
            perturbing.traceable_score(logits=head(test))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_scores_keep_very_confident_rows_apart_in_onnx(dtype):
    """MSP and ODIN's 1 − p_max = s / (1 + s) (s the non-top softmax terms) traced to ONNX:
    onnxruntime gives PyTorch's values to a few ulps where p_max rounds to 1 (logit gaps 20,
    40), not 0, and the same on ordinary rows and tied tops."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class Score(torch.nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, logits):
            return self.detector.traceable_score(logits=logits)

    rel = 1e-6 if dtype == torch.float32 else 1e-14
    for name, scale in (("msp", 1.0), ("odin", 1000.0)):
        detector = create_detector(name, **({"temperature": scale} if name == "odin" else {}))
        logits = torch.tensor([[0.0, 20 * scale, 0.0], [40 * scale, 0.0, 0.0],
                               [5.0, 5.0, 0.0], [1.0, 2.0, 3.0]], dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(Score(detector), (logits,), dynamo=True,
                                        dynamic_shapes=({0: torch.export.Dim("n")},))
        session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        (onnx_score,) = session.run(None, {session.get_inputs()[0].name: logits.numpy()})
        expected = detector.traceable_score(logits=logits)
        assert onnx_score.dtype == logits.numpy().dtype
        assert onnx_score.tolist() == pytest.approx(expected.tolist(), rel=rel, abs=0)
        for row, gap in ((0, 20), (1, 40)):  # two non-top terms e^−gap each
            s = 2 * math.exp(-gap)
            assert onnx_score[row] == pytest.approx(s / (1 + s), rel=rel, abs=0)


def test_export_module_is_the_decision_rule_on_the_network():
    """Same code, same values: the export module on images = DecisionRule.apply on net(x)."""
    net = _network(SMALL)
    rule = _rule(net, "knn", tau=0.7, adjustment=-0.5)
    images = _images(6, 9)
    with torch.no_grad():
        logits, score, prediction, confidence = ExportModule(net, rule)(images)
    expected = _torch_reference(net, rule, images)
    assert torch.equal(logits, torch.from_numpy(expected["logits"]))
    assert torch.equal(prediction, torch.from_numpy(expected["prediction"]))
    assert torch.allclose(score, torch.from_numpy(expected["open_score"]), rtol=1e-12)
    assert torch.allclose(confidence, torch.from_numpy(expected["confidence"]))
    assert not net.training  # the caller's network is not modified


def test_export_module_refusals():
    plain, oltr = _network(SMALL), _network(STAGE2)
    rule = closed_set_rule(CLASSES)
    rule.detector = create_detector("odin", epsilon=0.001)
    with pytest.raises(InputError, match="'odin' cannot be exported"):
        ExportModule(plain, rule)
    rule = closed_set_rule(CLASSES)
    rule.tau_normalization = 1.0
    with pytest.raises(InputError, match="τ-normalisation needs a model with a linear"):
        ExportModule(oltr, rule)
    with pytest.raises(InputError, match="3 classes but the network 4"):
        ExportModule(plain, closed_set_rule(CLASSES[:3]))
    rule = closed_set_rule(CLASSES)
    rule.detector = create_detector("knn")
    with pytest.raises(InputError, match="'knn' is not fitted"):
        ExportModule(plain, rule)


def test_closed_set_rule_never_answers_unknown():
    rule = closed_set_rule(CLASSES)
    assert rule.threshold is None and rule.open_score == "msp"
    assert rule.tau_normalization == 0 and rule.logit_adjustment == 0
    net = _network(SMALL)
    with torch.no_grad():
        _, _, prediction, _ = ExportModule(net, rule)(_images(5, 1))
        expected = net(_images(5, 1)).logits.argmax(dim=1)
    assert torch.equal(prediction, expected)


# --------------------------------------------------------------------------- ONNX parity
@pytest.fixture(scope="module", params=["msp", "energy"])
def plain_export(request, tmp_path_factory):
    """A plain model (linear head), τ-normalisation 0.7 and logit adjustment −0.5."""
    net = _network(SMALL)
    rule = _rule(net, request.param, tau=0.7, adjustment=-0.5)
    return net, rule, _export(tmp_path_factory, net, rule, f"plain-{request.param}")


def test_plain_model_matches_pytorch(plain_export):
    net, rule, path = plain_export
    assert rule.tau_normalization == 0.7 and rule.logit_adjustment == -0.5
    for batch, seed in ((1, 11), (7, 12)):  # the batch is dynamic (traced with 2 rows)
        images = _images(batch, seed)
        expected = _torch_reference(net, rule, images)
        _assert_parity(_run_onnx(path, images), expected, rule.threshold,
                       f"plain {rule.open_score} batch {batch}")
    assert (expected["prediction"] == -1).any() and (expected["prediction"] >= 0).any()


@pytest.fixture(scope="module", params=["knn", "reachability"])
def oltr_export(request, tmp_path_factory):
    """An OLTR stage-2 model: modulated attention, meta-embedding with its memory, cosine
    classifier; logit adjustment 0.5 on the decision."""
    net = _network(STAGE2)
    rule = _rule(net, request.param, tau=0.0, adjustment=0.5)
    return net, rule, _export(tmp_path_factory, net, rule, f"oltr-{request.param}")


def test_oltr_stage2_model_matches_pytorch(oltr_export):
    net, rule, path = oltr_export
    for batch, seed in ((1, 21), (9, 22)):
        images = _images(batch, seed)
        expected = _torch_reference(net, rule, images)
        _assert_parity(_run_onnx(path, images), expected, rule.threshold,
                       f"OLTR stage 2 {rule.open_score} batch {batch}")
    assert (expected["prediction"] == -1).any() and (expected["prediction"] >= 0).any()


_STANDALONE = textwrap.dedent("""
    import json, sys
    sys.path[:0] = json.loads(sys.argv[1])
    try:
        import oltr
    except ImportError:
        pass
    else:
        sys.exit("oltr is importable: the check is void")
    import numpy as np
    import onnxruntime
    session = onnxruntime.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    images = np.load(sys.argv[3])
    logits, score, prediction, confidence = session.run(None, {"input": images})
    threshold = json.loads(meta["oltr.threshold"])
    names = json.loads(meta["oltr.class_names"])
    assert "torch" not in sys.modules and "oltr" not in sys.modules
    print(json.dumps({"logits": logits.tolist(), "open_score": score.tolist(),
                      "prediction": prediction.tolist(), "confidence": confidence.tolist(),
                      "answers": [names[p] if p >= 0 else "unknown" for p in prediction],
                      "threshold": threshold, "data": json.loads(meta["oltr.data"])}))
""")


def test_exported_file_runs_without_oltr(oltr_export, tmp_path):
    """python -I -S (no site, no PYTHONPATH, no cwd on the path) with only the directories of
    numpy and onnxruntime added: oltr cannot be imported, and the answers match PyTorch."""
    onnxruntime = pytest.importorskip("onnxruntime")
    net, rule, path = oltr_export
    images = _images(5, 31)
    np.save(tmp_path / "images.npy", images.numpy())
    site = sorted({str(Path(module.__file__).parents[1]) for module in (np, onnxruntime)})
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _STANDALONE, json.dumps(site), str(path),
         str(tmp_path / "images.npy")], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    expected = _torch_reference(net, rule, images)
    got = {key: np.asarray(answer[key]) for key in OUTPUT_NAMES}
    got["logits"] = got["logits"].astype(np.float32)
    got["confidence"] = got["confidence"].astype(np.float32)
    _assert_parity(got, expected, rule.threshold, f"standalone {rule.open_score}")
    assert answer["threshold"] == rule.threshold  # exact: JSON keeps every digit
    assert answer["data"] == DATA
    assert answer["answers"] == [CLASSES[p] if p >= 0 else "unknown"
                                 for p in expected["prediction"]]


# --------------------------------------------------------------------------- the command
def _run_dir(tmp_path: Path, net, rule=None) -> Path:
    from oltr.train.checkpoint import save_model

    run = tmp_path / "run"
    stage = run / "stage1"
    stage.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"final_stage": "stage1"}))
    save_model(stage, net, {"model": SMALL, "num_classes": len(CLASSES), "in_chans": 1,
                            "data": DATA, "class_names": CLASSES, "stage": "stage1",
                            "train_counts": COUNTS})
    if rule is not None:
        rule.record["weights"] = {"sha256": weights_digest(stage / "model.safetensors")}
        rule.save(run)
    return run


def _command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="oltr")
    export_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_export_command_writes_the_run_with_its_decision_rule(tmp_path, capsys):
    """`oltr export RUN --onnx FILE --batch 7`: the final stage, its decision.json (knn,
    τ-normalisation, logit adjustment), a fixed batch of 7; metadata for a serving stack."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    net = _network(SMALL)
    rule = _rule(net, "knn", tau=0.5, adjustment=-0.25)
    run = _run_dir(tmp_path, net, rule)
    out = tmp_path / "models" / "fmnist.onnx"
    assert _command(["export", str(run), "--onnx", str(out), "--batch", "7"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (opset 20, batch 7, open score knn" in printed
    assert "onnxruntime matches PyTorch" in printed
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [7, 1, 16,
                                                                                      16]
    meta = {entry.key: json.loads(entry.value) for entry in model.metadata_props}
    assert meta["oltr.export_format"] == 1 and meta["oltr.class_names"] == CLASSES
    assert meta["oltr.threshold"] == rule.threshold and meta["oltr.open_score"] == "knn"
    assert meta["oltr.open_score_options"] == {"k": 1, "normalize": True}  # every option, spelt out
    assert (meta["oltr.tau_normalization"], meta["oltr.logit_adjustment"]) == (0.5, -0.25)
    assert meta["oltr.data"] == DATA and "(x - mean) / std" in meta["oltr.input"]
    assert meta["oltr.weights_sha256"] == weights_digest(run / "stage1" / "model.safetensors")
    images = _images(7, 41)
    _assert_parity(_run_onnx(out, images), _torch_reference(net, rule, images),
                   rule.threshold, "plain knn (from the run) batch 7")
    check_output_file(out, force=True)  # an oltr export may be replaced with --force

    # never overwritten without --force; never a file oltr did not export
    with pytest.raises(InputError, match="exists; pass --force"):
        _command(["export", str(run), "--onnx", str(out)])
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("not a model")
    with pytest.raises(InputError, match="not an ONNX model exported by oltr"):
        _command(["export", str(run), "--onnx", str(foreign), "--force"])
    assert foreign.read_text() == "not a model"


def test_export_command_refuses_foreign_onnx_links_and_stale_rules(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    net = _network(SMALL)
    rule = _rule(net, "msp", tau=0.0, adjustment=0.0)
    run = _run_dir(tmp_path, net, rule)
    # an ONNX model oltr did not write
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    foreign = tmp_path / "other.onnx"
    onnx.save_model(onnx.helper.make_model(graph), str(foreign))
    before = foreign.read_bytes()
    with pytest.raises(InputError, match="not an ONNX model exported by oltr"):
        _command(["export", str(run), "--onnx", str(foreign), "--force"])
    assert foreign.read_bytes() == before
    link = tmp_path / "link.onnx"
    link.symlink_to(foreign)
    with pytest.raises(InputError, match="symbolic link"):
        _command(["export", str(run), "--onnx", str(link), "--force"])
    with pytest.raises(InputError, match="not a file"):
        _command(["export", str(run), "--onnx", str(tmp_path), "--force"])
    # a rule fitted for other weights
    rule.record["weights"] = {"sha256": "0" * 64}
    rule.save(run)
    with pytest.raises(InputError, match="fitted for other weights"):
        _command(["export", str(run), "--onnx", str(tmp_path / "new.onnx")])
    assert not (tmp_path / "new.onnx").exists()


def test_export_command_without_a_decision_rule_exports_a_closed_set_rule(
        tmp_path, capsys, monkeypatch):
    from oltr import export

    run = _run_dir(tmp_path, _network(SMALL))
    calls = []
    monkeypatch.setattr(export, "export_onnx", lambda *args, **kwargs: calls.append(
        (args, kwargs)) or export.ExportResult(Path(args[2]), 20, None, "msp", None))
    assert _command(["export", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 0
    (stage, rule, _), options = calls[0]
    assert stage == run / "stage1" and rule is None and options["force"] is False
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("note: ") and "decision.json not found" in printed[0]
    assert "closed-set rule" in printed[0] and len(printed) == 2


def test_export_argument_errors(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    with pytest.raises(InputError, match="writes ONNX opset 18 or later"):
        export_onnx(_network(SMALL), None, tmp_path / "m.onnx", data=DATA, opset=17)
    with pytest.raises(InputError, match="batch size must be a positive integer"):
        export_onnx(_network(SMALL), None, tmp_path / "m.onnx", data=DATA, batch=0)
    with pytest.raises(InputError, match="needs its data settings"):
        export_onnx(_network(SMALL), None, tmp_path / "m.onnx")
    with pytest.raises(InputError, match="data.channels must be 1 or 3"):
        export_onnx(_network(SMALL), None, tmp_path / "m.onnx", data={**DATA, "channels": 2})
