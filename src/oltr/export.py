"""ONNX export of the full inference path: a trained network and its decision rule in one graph.

The exported model takes **preprocessed images** and answers with the decision rule's outputs;
a serving stack needs only ONNX Runtime (or any ONNX runtime) and numpy — not oltr, not torch.

Input ``input``: float32 (B, C, H, W), NCHW, with H = W = ``data.image_size`` and C =
``data.channels``, **already preprocessed as oltr evaluates**: the image read in mode ``L``
(C = 1) or ``RGB`` (C = 3); resized and centre-cropped as ``data.transform`` says (``small``:
shorter side to S then a centre S × S crop; ``imagenet``: shorter side to round(S · 256/224)
then a centre S × S crop; ``none``: no resizing — the images must already be S × S); scaled to
[0, 1] (pixel / 255) and normalised per channel, ``(x − mean) / std``. The data settings
(``image_size``, ``channels``, ``mean``, ``std``, ``transform``) are in the model's metadata
(``oltr.data``), so the serving stack can preprocess. The batch dimension is dynamic unless a
fixed batch size was asked for.

Outputs (what :meth:`oltr.decision.DecisionRule.apply` returns):

- ``logits`` float32 (B, K): the decision logits — the model's, τ-normalised (Kang et al.,
  ICLR 2020) and logit-adjusted (Menon et al., ICLR 2021) as the rule says;
- ``open_score`` float64 (B,): the rule's open score (its fitted detector; higher = more open);
- ``prediction`` int64 (B,): the arg-max class of ``logits``, or −1 ("unknown") where
  ``open_score`` exceeds the threshold (never −1 without a threshold);
- ``confidence`` float32 (B,): the maximum softmax probability of ``logits``.

The model's ``metadata_props`` hold (JSON values): ``oltr.export_format``, ``oltr.version``,
``oltr.class_names``, ``oltr.threshold`` (null: closed set), ``oltr.open_score`` and
``oltr.open_score_options``, ``oltr.open_score_logits``, ``oltr.tau_normalization``,
``oltr.logit_adjustment``, ``oltr.data``, ``oltr.input``, ``oltr.outputs`` and, when exported
from a run, ``oltr.weights_sha256``. ``oltr.export_format`` is what marks a file as oltr's:
``oltr export --force`` replaces no other file.

How: :class:`ExportModule` folds the network (backbone, modulated attention, meta-embedding
with its memory, classifier) and the rule into one ``forward(x)`` with tensor outputs only;
the open score is the detector's own formula (:meth:`~oltr.detectors.base.Detector.
traceable_score`, the formula :meth:`~oltr.detectors.base.Detector.score` applies after its
checks). It is traced with ``torch.onnx.export(dynamo=True)`` (torch.export → ONNX through
onnxscript), the exporter torch 2.14 maintains; the TorchScript-based exporter
(``dynamo=False``) is deprecated and cannot export ``aten::expm1`` (used by the OpenMax score's
Weibull CDF) at any opset. ``torch.cdist`` (the memory's reachability, the reachability and
OpenMax scores) has no ONNX translation in torch.export's form and dispatches on the batch size
(≤ 25 rows: differences; more: a matrix product), which would pin the batch dimension; while
exporting, it is replaced by ``sqrt(max(‖a‖² + ‖b‖² − 2 a·b, 0))`` computed in float64
(:func:`euclidean_distances`), as exact as ``torch.cdist`` in float32 or better.

ODIN with input perturbation (ε > 0) is refused: it needs the gradient of the network with
respect to the input. Every other registered open score exports.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oltr import __version__
from oltr.decision import DecisionRule
from oltr.detectors import MSP, network_head
from oltr.detectors.base import Detector
from oltr.errors import InputError, OltrError
from oltr.inference import load_model
from oltr.io import atomic_write

#: The exporter's own opset in torch 2.14 (``torch.onnx`` dynamo exporter, onnxscript's
#: torchlib): every op is emitted natively, no version conversion.
DEFAULT_OPSET = 20
#: The lowest opset that exporter writes (asked for less, it silently writes 18).
MIN_OPSET = 18
EXPORT_FORMAT = 1
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "open_score", "prediction", "confidence")
METADATA_PREFIX = "oltr."
FORMAT_KEY = METADATA_PREFIX + "export_format"
DATA_KEYS = ("image_size", "channels", "mean", "std", "transform")
#: ONNX Runtime vs PyTorch on the same fp32 input: |a − b| <= ATOL + RTOL · |b| for the logits,
#: confidence and open score (measured differences are 100× smaller; see tests/test_export.py).
ATOL = 1e-4
RTOL = 1e-4
_TRACE_BATCH = 2  # torch.export specialises sizes 0 and 1: trace a dynamic batch with 2 rows
_PROTOBUF_LIMIT = 2**31 - 1

INPUT_DESCRIPTION = (
    "float32 (B, C, H, W) NCHW, H = W = data.image_size, C = data.channels: the image read in "
    "mode L (C = 1) or RGB (C = 3), resized and centre-cropped as data.transform says (small: "
    "shorter side to image_size, centre crop; imagenet: shorter side to round(image_size * "
    "256 / 224), centre crop; none: no resizing), scaled to [0, 1] (pixel / 255), then "
    "(x - mean) / std per channel")
OUTPUT_DESCRIPTION = (
    "logits float32 (B, K): decision logits (tau-normalised, logit-adjusted); open_score "
    "float64 (B,): higher = more open; prediction int64 (B,): argmax of logits, -1 (unknown) "
    "where open_score > threshold; confidence float32 (B,): max softmax of logits")


# --------------------------------------------------------------------------- cdist for ONNX
def euclidean_distances(
    x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0, compute_mode: str | None = None
) -> torch.Tensor:
    """``torch.cdist(x1, x2)`` for p = 2 as ``sqrt(max(‖a‖² + ‖b‖² − 2 a·bᵀ, 0))``, computed
    in float64 and returned in the inputs' dtype: (…, P, d) × (…, R, d) → (…, P, R). Torch
    operations with an ONNX translation and no branch on the batch size; used in place of
    ``torch.cdist`` while exporting (``compute_mode`` is ignored).

    Raises:
        InputError: p ≠ 2.
    """
    if p != 2.0:
        raise InputError("ONNX export supports torch.cdist with p = 2 only", value=p)
    a, b = x1.double(), x2.double()
    squared = ((a * a).sum(dim=-1, keepdim=True) + (b * b).sum(dim=-1).unsqueeze(-2)
               - 2.0 * a @ b.transpose(-1, -2))
    return squared.clamp_min(0.0).sqrt().to(torch.promote_types(x1.dtype, x2.dtype))


class _ExportableFunctions(torch.overrides.TorchFunctionMode):
    """While active, ``torch.cdist`` runs as :func:`euclidean_distances`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is torch.cdist:
            return euclidean_distances(*args, **kwargs)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- the module
def closed_set_rule(class_names: list[str], train_counts: Any = None) -> DecisionRule:
    """The rule of a run without a fitted ``decision.json``: the model's own logits (no
    τ-normalisation, no logit adjustment), the MSP open score, no threshold (never
    "unknown"). ``train_counts`` (K,) default to ones (they only weigh a logit adjustment)."""
    counts = torch.ones(len(class_names), dtype=torch.int64) if train_counts is None \
        else torch.as_tensor(np.asarray(train_counts), dtype=torch.int64)
    return DecisionRule(class_names=list(class_names), train_counts=counts,
                        open_score="msp", detector=MSP(), threshold=None,
                        record={"source": "closed-set rule (no decision.json)"})


class ExportModule(nn.Module):
    """A network and its decision rule as one ``forward(x)`` with tensor outputs only.

    ``forward(x)``: x float32 (B, C, H, W), preprocessed (module docstring) → ``logits``
    float32 (B, K) (decision logits), ``open_score`` float64 (B,), ``prediction`` int64 (B,)
    (−1 = unknown), ``confidence`` float32 (B,) — the values of
    :meth:`DecisionRule.apply` on the network's outputs, computed by the same code (the rule's
    :meth:`~DecisionRule.compose`, with the detector's formula through
    :meth:`~oltr.detectors.base.Detector.traceable_score`).

    The network is copied (float32, CPU, eval mode), so the caller's is left as it was. A
    rule without a detector scores with MSP (its ``open_score`` name) and never answers
    "unknown".

    Raises:
        InputError: the rule's classes do not match the network's; τ-normalisation of a head
            that is not linear; an open score that cannot be exported (ODIN with ε > 0) or is
            not fitted.
    """

    def __init__(self, net: nn.Module, rule: DecisionRule) -> None:
        super().__init__()
        if not callable(getattr(net, "forward_head", None)):
            raise InputError("ONNX export needs an oltr network (OLTRNetwork)",
                             value=type(net).__name__)
        num_classes = int(getattr(net, "num_classes", -1))
        if len(rule.class_names) != num_classes:
            raise InputError(f"the decision rule has {len(rule.class_names)} classes but the "
                             f"network {num_classes}")
        # FSLwF's class weights are evaluated once: no branch on has_prototypes in the graph
        self.net = copy.deepcopy(net).float().cpu().eval().fix_class_weights()
        self.rule = rule
        self.detector: Detector = rule.detector if rule.detector is not None else MSP()
        if self.rule.tau_normalization != 0.0 and self.net.linear_classifier() is None:
            raise InputError("τ-normalisation needs a model with a linear classifier on the "
                             "direct feature (no meta-embedding)",
                             value=self.rule.tau_normalization)
        reason = self.detector.export_refusal()
        if reason is not None:
            raise InputError(f"open score {self.detector.name!r} cannot be exported: {reason}")
        if not self.detector.is_fitted:
            raise InputError(f"open score {self.detector.name!r} is not fitted")
        self.head = network_head(self.net) if "head" in self.detector.inputs else None
        self.threshold = rule.threshold if rule.detector is not None else None

    def train(self, mode: bool = True) -> ExportModule:
        """Always eval mode: dropout and batch statistics never act in the exported graph."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        decided = self.rule.compose(out.logits, out.features,
                                    classifier=self.net.linear_classifier(), score=self._score)
        decision = decided["logits"]
        confidence = torch.softmax(decision, dim=1).max(dim=1).values
        return decision, decided["open_score"], decided["prediction"], confidence

    def _score(self, score_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The open score in the graph: the detector's formula (no checks), float64 (B,)."""
        return self.detector.traceable_score(logits=score_logits, features=features,
                                             head=self.head).double()


# --------------------------------------------------------------------------- files
def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise InputError("ONNX export needs the onnx package: pip install 'oltr[export]'") \
            from None
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise InputError("ONNX export needs the onnxscript package: pip install "
                         "'oltr[export]'") from None
    return onnx


def read_export_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``oltr.*`` metadata of an ONNX model oltr exported, or None when ``path`` is not
    one (not an ONNX model, or one without ``oltr.export_format``)."""
    onnx = _require_onnx()
    from google.protobuf.message import DecodeError

    try:
        if Path(path).stat().st_size > _PROTOBUF_LIMIT:  # larger than any file oltr writes
            return None
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError):  # not an ONNX model we can read
        return None
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    if FORMAT_KEY not in metadata:
        return None
    return {key: value for key, value in metadata.items() if key.startswith(METADATA_PREFIX)}


def check_output_file(path: str | Path, force: bool) -> None:
    """Refuse to write ``path`` unless it is new, or ``force`` and an ONNX model oltr exported
    (never a directory, a symbolic link or another file).

    Raises:
        InputError: naming the file and what to do.
    """
    path = Path(path)
    if path.is_symlink():
        raise InputError("is a symbolic link; oltr does not replace links: choose another "
                         "--onnx file", path=path)
    if not path.exists():
        return
    if not path.is_file():
        raise InputError("exists and is not a file: choose another --onnx file", path=path)
    if not force:
        raise InputError("exists; pass --force to replace an ONNX model oltr exported",
                         path=path)
    if read_export_metadata(path) is None:
        raise InputError("exists and is not an ONNX model exported by oltr; oltr never "
                         "overwrites it: choose another --onnx file", path=path)


def _data_settings(data: Mapping[str, Any] | None) -> dict[str, Any]:
    if data is None:
        raise InputError("exporting a network needs its data settings (image_size, channels, "
                         "mean, std, transform; model.json's 'data')")
    missing = [key for key in DATA_KEYS if key not in data]
    if missing:
        raise InputError(f"the data settings lack {missing}", value=sorted(data))
    settings = {key: data[key] for key in DATA_KEYS}
    size, channels = settings["image_size"], settings["channels"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError("data.image_size must be a positive integer", value=size)
    if channels not in (1, 3):
        raise InputError("data.channels must be 1 or 3", value=channels)
    return settings


def _metadata(rule: DecisionRule, detector: Detector, threshold: float | None,
              data: Mapping[str, Any], digest: str | None) -> dict[str, str]:
    entries: dict[str, Any] = {
        "export_format": EXPORT_FORMAT,
        "version": __version__,
        "class_names": rule.class_names,
        "threshold": threshold,
        "open_score": detector.name,
        "open_score_options": detector.config(),
        "open_score_logits": rule.open_score_logits,
        "tau_normalization": rule.tau_normalization,
        "logit_adjustment": rule.logit_adjustment,
        "data": dict(data),
        "input": INPUT_DESCRIPTION,
        "outputs": OUTPUT_DESCRIPTION,
    }
    if digest is not None:
        entries["weights_sha256"] = digest
    return {METADATA_PREFIX + key: json.dumps(value, ensure_ascii=False)
            for key, value in entries.items()}


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the file, its opset and batch size (None: dynamic),
    the open score and threshold, and the largest |ONNX Runtime − PyTorch| difference per
    output on a probe batch (empty when onnxruntime is not installed)."""

    path: Path
    opset: int
    batch: int | None
    open_score: str
    threshold: float | None
    differences: dict[str, float] = field(default_factory=dict)
    mismatched_predictions: int = 0


def _load_source(source: str | Path | nn.Module, data: Mapping[str, Any] | None
                 ) -> tuple[nn.Module, dict[str, Any], list[str] | None, str | None]:
    if isinstance(source, nn.Module):
        return source, _data_settings(data), None, None
    stage_dir = Path(source)
    net, info = load_model(stage_dir)
    return net, _data_settings(data if data is not None else info["data"]), \
        list(info["class_names"]), info["weights_sha256"]


def _check_rule(rule: DecisionRule, class_names: list[str] | None, digest: str | None) -> None:
    if class_names is not None and list(rule.class_names) != class_names:
        raise InputError("the decision rule's class names differ from the model's "
                         "(model.json): it was fitted for another model")
    fitted_for = (rule.record.get("weights") or {}).get("sha256")
    if digest is not None and fitted_for is not None and fitted_for != digest:
        raise InputError("the decision rule was fitted for other weights (its sha256 differs "
                         "from model.safetensors'): fit it again for these weights",
                         value=fitted_for)


def export_onnx(
    source: str | Path | nn.Module,
    rule: DecisionRule | None,
    path: str | Path,
    *,
    data: Mapping[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    force: bool = False,
    verify: bool = True,
) -> ExportResult:
    """Export a network and its decision rule to the ONNX file ``path`` (module docstring).

    Args:
        source: a trained stage directory (``model.safetensors`` + ``model.json``, read with
            :func:`oltr.inference.load_model`) or an :class:`~oltr.models.network.OLTRNetwork`.
        rule: the decision rule (:meth:`DecisionRule.load`); None: :func:`closed_set_rule`.
        path: the ONNX file to write (atomically; parent folders are created).
        data: the data settings (``image_size``, ``channels``, ``mean``, ``std``,
            ``transform``); needed for a network, default ``model.json``'s for a stage.
        opset: the ONNX opset, >= :data:`MIN_OPSET` (default :data:`DEFAULT_OPSET`), asked
            of torch's exporter; InputError if it writes another one.
        batch: a fixed batch size; None (default): a dynamic batch dimension.
        force: replace an existing ``path`` if it is an ONNX model oltr exported.
        verify: run the file with ONNX Runtime (when installed) on a probe batch and compare
            it with PyTorch (:data:`ATOL`, :data:`RTOL`).

    Returns:
        :class:`ExportResult`.

    Raises:
        InputError: a missing or unwritable ``path`` (see :func:`check_output_file`), a rule
            that does not fit the model, an open score that cannot be exported, onnx or
            onnxscript not installed, a model over protobuf's 2 GB limit.
        OltrError: the exported file disagrees with PyTorch beyond the tolerance.
    """
    onnx = _require_onnx()
    path = Path(path)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise InputError(f"torch.onnx's exporter writes ONNX opset {MIN_OPSET} or later "
                         f"(default {DEFAULT_OPSET})", value=opset)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)
                              or batch < 1):
        raise InputError("the batch size must be a positive integer", value=batch)
    check_output_file(path, force)
    net, settings, class_names, digest = _load_source(source, data)
    if rule is None:
        rule = closed_set_rule(class_names or [str(k) for k in range(net.num_classes)])
    _check_rule(rule, class_names, digest)
    module = ExportModule(net, rule)
    shape = (batch or _TRACE_BATCH, settings["channels"], settings["image_size"],
             settings["image_size"])
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module(example)  # the rule's own checks raise here, before tracing, as InputError
    model = _export(module, example, opset, dynamic=batch is None)
    written = next((entry.version for entry in model.opset_import
                    if entry.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise InputError(f"torch.onnx's exporter wrote opset {written} when asked for {opset}; "
                         f"choose another --opset (default {DEFAULT_OPSET})", value=opset)
    for key, value in _metadata(rule, module.detector, module.threshold, settings, digest).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = ("oltr: open long-tailed recognition. Input: " + INPUT_DESCRIPTION
                        + ". Outputs: " + OUTPUT_DESCRIPTION + ".")
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise InputError("the model and its open score's state exceed protobuf's 2 GB limit "
                         "of one ONNX file", value=model.ByteSize())
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_output_file(path, force)  # again: the export took a while
    atomic_write(path, lambda tmp: onnx.save_model(model, str(tmp)))
    result = ExportResult(path=path, opset=opset, batch=batch, open_score=module.detector.name,
                          threshold=module.threshold)
    if verify:
        _verify(module, path, result, shape)
    return result


def _export(module: ExportModule, example: torch.Tensor, opset: int, dynamic: bool) -> Any:
    """The ONNX ModelProto of ``module`` traced on ``example`` (dynamo exporter)."""
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    log = io.StringIO()
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(log),
              contextlib.redirect_stderr(log), _ExportableFunctions(), torch.no_grad()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes, verbose=False, optimize=True)
    except OltrError:
        raise
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None:  # an oltr error raised while tracing, wrapped by torch
            if isinstance(cause, OltrError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # the exporter's "Exception summary" names the failing operator on a "<class …>" line
        summary = next((line for line in lines if line.startswith("<class")),
                       lines[0] if lines else "")
        raise InputError(f"torch.onnx.export failed at opset {opset}: "
                         f"{type(exc).__name__}: {summary}") from exc
    return program.model_proto


def _verify(module: ExportModule, path: Path, result: ExportResult,
            shape: tuple[int, ...]) -> None:
    """ONNX Runtime vs PyTorch on a probe batch: record the largest differences; OltrError
    when one exceeds the tolerance (or a prediction differs away from a tie)."""
    try:
        import onnxruntime
    except ImportError:
        return
    probe = torch.randn((result.batch or 3,) + shape[1:],
                        generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: probe.numpy()})))
    with torch.no_grad():
        expected = dict(zip(OUTPUT_NAMES, (t.numpy() for t in module(probe))))
    report = compare_outputs(got, expected, module.threshold)
    result.differences = report["differences"]
    result.mismatched_predictions = report["mismatched_predictions"]
    if report["failures"]:
        raise OltrError(f"{path}: ONNX Runtime disagrees with PyTorch: "
                        + "; ".join(report["failures"]))


def compare_outputs(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                    threshold: float | None, atol: float = ATOL, rtol: float = RTOL
                    ) -> dict[str, Any]:
    """Compare exported-model outputs ``got`` with the PyTorch ``expected`` ones.

    Returns ``differences`` (largest |got − expected| of ``logits``, ``open_score`` and
    ``confidence``), ``mismatched_predictions`` (rows whose prediction differs) and
    ``failures`` (messages): a float output outside ``atol + rtol · |expected|``, a
    prediction that differs where neither the open score is within tolerance of the threshold
    nor the top two decision logits are within tolerance of each other.
    """
    differences, failures = {}, []
    for name in ("logits", "open_score", "confidence"):
        a, b = np.asarray(got[name], np.float64), np.asarray(expected[name], np.float64)
        if a.shape != b.shape:
            failures.append(f"{name} has shape {a.shape}, expected {b.shape}")
            continue
        differences[name] = float(np.max(np.abs(a - b))) if a.size else 0.0
        if not np.allclose(a, b, atol=atol, rtol=rtol):
            failures.append(f"{name} differs by up to {differences[name]:.3g}")
    predicted, wanted = np.asarray(got["prediction"]), np.asarray(expected["prediction"])
    differ = predicted != wanted
    if differ.any():
        logits = np.sort(np.asarray(expected["logits"], np.float64), axis=1)
        tie = logits[:, -1] - logits[:, -2] <= 2 * (atol + rtol * np.abs(logits[:, -1])) \
            if logits.shape[1] > 1 else np.zeros(len(logits), bool)
        score = np.asarray(expected["open_score"], np.float64)
        near = (np.abs(score - threshold) <= atol + rtol * abs(threshold)
                if threshold is not None else np.zeros(len(score), bool))
        unexplained = differ & ~tie & ~near
        if unexplained.any():
            failures.append(f"{int(unexplained.sum())} predictions differ away from a tie or "
                            "the threshold")
    return {"differences": differences, "mismatched_predictions": int(differ.sum()),
            "failures": failures}
