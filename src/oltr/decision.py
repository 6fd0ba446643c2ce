"""The decision rule: everything between a network's outputs and its answer — a class, or
"unknown" (label -1).

A :class:`DecisionRule` holds every choice that is made on the validation split once a model
is trained, and applies them, in torch, in this order:

1. **τ-normalisation** of a linear classifier (Kang et al., ICLR 2020, §4): logits
   ``v · w_k / ‖w_k‖^τ + b_k`` (τ = 0: the classifier's own logits);
2. **logit adjustment** of the closed-set decision (Menon et al., ICLR 2021):
   ``z + τ · log π`` with π the train class frequencies (τ < 0: the post-hoc correction of
   an instance-trained model, τ = −1 deciding as if classes were balanced; τ > 0 puts back
   part of the prior of a class-balanced model; τ = 0: as trained);
3. an **open score** (any registered detector of :mod:`oltr.detectors`, with its fitted
   state), computed on the model's logits (``open_score_logits: model``; the logit
   adjustment moves the closed-set decision only) or on the adjusted ones (``decision``);
4. a **threshold**: an image whose open score exceeds it is answered "unknown".

Every ``auto`` choice maximises one declared objective on val (:data:`SELECT_OBJECTIVES`,
config ``eval.select``) over a fixed grid that contains the neutral value, ties going to the
value nearest the neutral one — never a single shot group's accuracy, never test data:

- ``balanced_accuracy`` (default): mean per-class recall on the known val split (the val and
  test splits are balanced, so this is the quantity the report's overall accuracy estimates);
  the open score (``auto``) is the candidate with the highest val AUROC against ``val_open``;
  the threshold accepts ``eval.accept_rate`` of the known val images;
- ``f_measure`` (needs a ``val_open`` split): the τ's, the open score and the threshold
  maximise the F-measure (paper §D.4) on val ∪ val_open;
- ``auroc`` (needs ``val_open``): as ``balanced_accuracy``; named for benchmarks that only
  care about detection.

Without a ``val_open`` split an ``auto`` open score is the package's documented default
(:data:`DEFAULT_OPEN_SCORE`; docs/decision.md gives the reason). The fitted rule is saved
beside the weights (``decision.json`` + ``decision.safetensors``) with the sha256 of the
weights it was fitted for; evaluation, ``oltr predict`` and ONNX export all apply it.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from oltr import metrics
from oltr.detectors import create_detector, list_detectors
from oltr.detectors.base import Detector
from oltr.errors import InputError
from oltr.io import atomic_write, atomic_write_text, read_json_object

DECISION_JSON = "decision.json"
DECISION_TENSORS = "decision.safetensors"
DECISION_FORMAT = 1
#: What ``open_score_logits`` may say: the open score reads the model's logits or the decision's.
OPEN_SCORE_LOGITS = ("model", "decision")
SELECT_OBJECTIVES = ("balanced_accuracy", "f_measure", "auroc")
#: τ of the logit adjustment: −1 … 1 in steps of 1/8 (0 is neutral).
LOGIT_ADJUSTMENT_GRID = tuple(i / 8 for i in range(-8, 9))
#: τ of τ-normalisation: 0 … 2 in steps of 0.1 (0 is neutral).
TAU_NORMALIZATION_GRID = tuple(i / 10 for i in range(21))
#: The open score of ``eval.open_score: auto`` where no ``val_open`` split exists to choose:
#: auto chose knn on val_open in every development run (AUROC 97.1–97.9; Mahalanobis next,
#: 95.9–97.1), docs/protocol.md "Design choices".
DEFAULT_OPEN_SCORE = "knn"
#: The candidates ``eval.open_score: auto`` chooses from on ``val_open``.
AUTO_OPEN_SCORES = ("msp", "max_logit", "energy", "gen", "knn", "mahalanobis",
                    "relative_mahalanobis", "vim", "react", "ash", "scale")
#: Options of the auto candidates: ViM in the paper's form only (origin −W⁺b, linear heads),
#: the candidate set with which the default open score and the reported rules were decided
#: (docs/protocol.md); ViM's mean-origin variant for other heads is there by name
#: (``eval.open_score: vim``, ``oltr evaluate --detector vim``).
AUTO_CANDIDATE_OPTIONS: dict[str, dict[str, Any]] = {"vim": {"origin": "head"}}


class ForeignTensorsError(InputError):
    """``decision.safetensors`` is not the file its ``decision.json`` was saved with."""


def select_on_grid(
    grid: Sequence[float], objective: Callable[[float], float], neutral: float = 0.0
) -> tuple[float, list[float]]:
    """The value of ``grid`` with the highest ``objective``; among values whose objective
    equals the best (to 1e-12), the one nearest ``neutral`` (then the smaller). Returns the
    value and the objective of every grid value (NaN objectives never win)."""
    values = [float(objective(value)) for value in grid]
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float(neutral), values
    best = max(finite)
    winners = [g for g, v in zip(grid, values) if not math.isnan(v) and v >= best - 1e-12]
    return float(min(winners, key=lambda g: (abs(g - neutral), g))), values


def balanced_accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
                      ) -> float:
    """Mean per-class recall of ``argmax(logits)`` over the classes present in ``labels``
    (scikit-learn's ``balanced_accuracy_score``); logits (N, K), labels (N,) in 0..K-1."""
    predictions = np.asarray(torch.as_tensor(logits).argmax(dim=1))
    labels = np.asarray(labels).astype(np.int64)
    recalls = [float((predictions[labels == k] == k).mean()) for k in np.unique(labels)]
    return float(np.mean(recalls))


def open_f_measure(known_logits: torch.Tensor, known_labels: np.ndarray,
                   known_scores: np.ndarray, open_scores: np.ndarray, threshold: float) -> float:
    """The F-measure (paper §D.4) of known images plus open images at ``threshold``."""
    predictions = np.concatenate([np.asarray(known_logits.argmax(dim=1)),
                                  np.zeros(len(open_scores), dtype=np.int64)])
    scores = np.concatenate([known_scores, open_scores])
    labels = np.concatenate([np.asarray(known_labels), np.full(len(open_scores), -1)])
    rejected = metrics.reject(predictions, scores, threshold)
    return float(metrics.f_measure(rejected, labels)["f_measure"])


def best_f_threshold(known_logits: torch.Tensor, known_labels: np.ndarray,
                     known_scores: np.ndarray, open_scores: np.ndarray) -> tuple[float, float]:
    """The threshold (one of the observed scores) with the highest val F-measure, and that
    F-measure; ties go to the larger threshold (fewer knowns rejected)."""
    candidates = np.unique(np.concatenate([known_scores, open_scores]))
    if len(candidates) > 512:  # quantiles keep this O(512 · N)
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, 512)))
    best_t, best_f = float(candidates[-1]), -1.0
    for t in candidates[::-1]:
        value = open_f_measure(known_logits, known_labels, known_scores, open_scores, float(t))
        if value > best_f + 1e-12:
            best_t, best_f = float(t), value
    return best_t, best_f


@dataclass
class DecisionRule:
    """τ-normalisation, logit adjustment, open score (a fitted detector) and threshold.

    ``train_counts`` (K,) are the train images per class (the prior of the logit adjustment);
    ``threshold`` is None for a closed-set rule (never "unknown"). ``record`` says how each
    value was chosen (source, grid, objective values) and for which weights
    (``record["weights"]``: sha256 and epoch).
    """

    class_names: list[str]
    train_counts: torch.Tensor
    tau_normalization: float = 0.0
    logit_adjustment: float = 0.0
    open_score: str = "msp"
    detector: Detector | None = None
    threshold: float | None = None
    open_score_logits: str = "model"
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()
        if self.threshold is not None:
            self.threshold = float(self.threshold)

    # ------------------------------------------------------------------ checking
    def check(self, path: Path | None = None) -> None:
        """The rule as one unit (made at construction, :meth:`save` and :meth:`load`): τ's
        finite, τ-normalisation ≥ 0, the threshold finite or None, ``open_score`` a
        registered detector, ``open_score_logits`` one of :data:`OPEN_SCORE_LOGITS`, one train
        count per class, and a threshold only with a detector (a threshold without an open
        score would be applied by no one the same way). InputError (naming ``path``)."""
        def bad(message: str, value: Any) -> InputError:
            return InputError(message, path=path, value=value)
        for key in ("tau_normalization", "logit_adjustment"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise bad(f"'{key}' must be a finite number", value)
        if self.tau_normalization < 0:
            raise bad("'tau_normalization' must be ≥ 0 (0: the classifier as trained)",
                      self.tau_normalization)
        threshold = self.threshold
        if threshold is not None and (isinstance(threshold, bool)
                                      or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise bad("'threshold' must be a finite number or null", threshold)
        if self.open_score not in list_detectors():
            raise bad(f"unknown open score (valid: {', '.join(list_detectors())})",
                      self.open_score)
        if self.open_score_logits not in OPEN_SCORE_LOGITS:
            raise bad(f"'open_score_logits' must be one of {', '.join(OPEN_SCORE_LOGITS)}",
                      self.open_score_logits)
        if threshold is not None and self.detector is None:
            raise bad("a threshold needs an open score and its detector (a closed-set rule has "
                      "threshold null)", threshold)
        if self.detector is not None and self.detector.name != self.open_score:
            raise bad(f"the detector is '{self.detector.name}' but open_score says "
                      f"'{self.open_score}'", self.open_score)
        counts = torch.as_tensor(self.train_counts)
        if counts.ndim != 1 or counts.shape[0] != len(self.class_names):
            raise bad(f"train_counts must hold one count per class ({len(self.class_names)})",
                      tuple(counts.shape))

    # ------------------------------------------------------------------ applying
    def closed_logits(self, logits: torch.Tensor, features: torch.Tensor,
                      classifier: torch.nn.Module | None = None) -> torch.Tensor:
        """The model logits after τ-normalisation (needs the linear ``classifier``)."""
        if self.tau_normalization == 0.0:
            return logits
        if classifier is None or not hasattr(classifier, "weight"):
            raise InputError("τ-normalisation needs the model's linear classifier",
                             value=self.tau_normalization)
        weight = classifier.weight.detach().to(features.device, torch.float64)
        norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        normalized = weight / norms.pow(self.tau_normalization)
        out = features.double() @ normalized.t()
        bias = getattr(classifier, "bias", None)
        if bias is not None:
            out = out + bias.detach().to(features.device, torch.float64)
        return out.to(logits.dtype)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits + τ · log π`` (the logit adjustment of the closed-set decision)."""
        if self.logit_adjustment == 0.0:
            return logits
        prior = self.train_counts.to(logits.device, torch.float64)
        log_prior = (prior / prior.sum()).log()
        return (logits.double() + self.logit_adjustment * log_prior).to(logits.dtype)

    def compose(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        *,
        classifier: torch.nn.Module | None = None,
        score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rule's composition on tensors — τ-normalisation → logit adjustment → open score
        → threshold — the one :meth:`apply` and the exported graph (`oltr.export`) both run.

        ``logits`` (N, K) and ``features`` (N, d) are the model's; ``classifier`` the linear
        layer τ-normalisation rescales; ``score(score_logits, features)`` → (N,) the open
        score (None: no open score). Returns ``logits`` (N, K) (the decision logits),
        ``score_logits`` (N, K) (what the open score reads: the decision logits or the
        τ-normalised model logits, as ``open_score_logits`` says), ``closed_prediction``
        (N,), with ``score``: ``open_score`` (N,), and ``prediction`` (N,) — −1 where the
        score exceeds the threshold of the rule's detector, else the closed prediction.
        No shape checks (:meth:`apply` makes them). Raises InputError: τ-normalisation
        without a linear ``classifier``."""
        model_logits = self.closed_logits(logits, features, classifier)
        decision = self.adjust(model_logits)
        closed = decision.argmax(dim=1)
        score_logits = decision if self.open_score_logits == "decision" else model_logits
        out = {"logits": decision, "score_logits": score_logits, "closed_prediction": closed}
        if score is not None:
            scores = score(score_logits, features)
            out["open_score"] = scores
            if self.detector is not None and self.threshold is not None:
                if scores.device != closed.device:
                    scores = scores.to(closed.device)
                out["prediction"] = torch.where(scores > self.threshold,
                                                torch.full_like(closed, -1), closed)
        out.setdefault("prediction", closed)
        return out

    def apply(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        *,
        classifier: torch.nn.Module | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        open_set: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The rule on one batch of outputs: model ``logits`` (N, K) and direct ``features``
        (N, d); ``classifier`` for τ-normalisation, ``head`` (features → logits) for
        detectors that re-run it (ReAct, ASH, SCALE). Returns (:meth:`compose`) ``logits``
        (the decision logits), ``score_logits``, ``closed_prediction`` (N,), ``open_score``
        (N,) float64 (higher = more open; a closed-set rule, without a detector, gives msp's
        1 − max softmax for information, as its exported form does), ``prediction`` (N,)
        with −1 where the open score exceeds the threshold (a closed-set rule rejects
        nothing). ``open_set=False``: the closed-set decision only (no ``open_score``, no
        rejection).

        Raises InputError: ``logits`` not (N, K) with the rule's K classes, or ``features``
        not (N, d)."""
        if not isinstance(logits, torch.Tensor) or not isinstance(features, torch.Tensor):
            logits, features = torch.as_tensor(logits), torch.as_tensor(features)
        if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
            raise InputError(f"logits must be (N, {len(self.class_names)}): one column per class "
                             "of the rule", value=tuple(logits.shape))
        if features.ndim != 2 or features.shape[0] != logits.shape[0]:
            raise InputError(f"features must be (N, d) with the logits' N = {logits.shape[0]}",
                             value=tuple(features.shape))
        score = None
        if open_set and self.detector is not None:
            def score(score_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
                return torch.as_tensor(self.score(score_logits, features, head))
        out = self.compose(logits, features, classifier=classifier, score=score)
        if open_set and self.detector is None:
            out["open_score"] = 1.0 - out["logits"].double().softmax(dim=1).amax(dim=1)
        return out

    def score(self, logits: torch.Tensor, features: torch.Tensor,
              head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
        """The open score of the rule's detector (higher = more open), float64 (N,)."""
        if self.detector is None:
            raise InputError("this decision rule has no open score (closed-set only)")
        return self.detector.score(**_detector_inputs(self.detector, logits, features, head))

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path) -> None:
        """Write ``decision.json`` and ``decision.safetensors`` (the detector's fitted state
        and the train counts) into ``directory``, atomically; ``decision.json`` records the
        sha256 of ``decision.safetensors`` (``tensors_sha256``), which :meth:`load` checks.
        InputError: the rule is inconsistent (:meth:`check`)."""
        directory = Path(directory)
        self.check()
        tensors = {"train_counts": self.train_counts.detach().cpu().to(torch.int64)}
        detector_config: dict[str, Any] = {}
        if self.detector is not None:
            detector_config = self.detector.config()
            for key, value in self.detector.state_dict().items():
                tensors[f"detector.{key}"] = value.detach().cpu().contiguous()
        atomic_write(directory / DECISION_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        document = {
            "format": DECISION_FORMAT,
            "class_names": self.class_names,
            "tau_normalization": self.tau_normalization,
            "logit_adjustment": self.logit_adjustment,
            "open_score": self.open_score if self.detector is not None else None,
            "open_score_options": detector_config,
            "open_score_logits": self.open_score_logits,
            "threshold": self.threshold,
            "record": self.record,
            "tensors_sha256": _file_sha256(directory / DECISION_TENSORS),
        }
        atomic_write_text(directory / DECISION_JSON, json.dumps(document, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> DecisionRule:
        """Read a rule written by :meth:`save` and check it as one unit; InputError naming the
        file when it is missing, damaged, not written by oltr, or inconsistent:

        - schema: ``format``, ``class_names`` (strings), ``tau_normalization``,
          ``logit_adjustment``, ``open_score`` (a detector's name, or null: closed set),
          ``open_score_options``, ``open_score_logits``, ``threshold`` (null: closed set) and
          ``record``, each present and of its type;
        - ranges and consistency (:meth:`check`): τ-normalisation ≥ 0, finite numbers, a
          threshold only with an open score, the detector's state complete in the tensors;
        - ``decision.safetensors`` is the file this ``decision.json`` was saved with: its
          sha256 equals ``tensors_sha256``. A rule saved before oltr recorded that hash (no
          ``tensors_sha256``) keeps loading, unchecked on that point only.
        """
        directory = Path(directory)
        path = directory / DECISION_JSON
        document = read_json_object(path, "decision rule")
        if document.get("format") != DECISION_FORMAT:
            raise InputError("not an oltr decision rule (wrong or missing 'format')", path=path,
                             value=document.get("format"))
        expected = {"class_names": list, "tau_normalization": (int, float),
                    "logit_adjustment": (int, float), "open_score_logits": str,
                    "record": dict, "open_score_options": dict}
        for key, kind in expected.items():
            if not isinstance(document.get(key), kind) or isinstance(document.get(key), bool):
                raise InputError(f"key '{key}' is missing or of the wrong type", path=path,
                                 value=document.get(key))
        if not all(isinstance(name, str) for name in document["class_names"]):
            raise InputError("'class_names' must be a list of strings", path=path)
        for key, meaning in (("threshold", "null for a closed-set rule"),
                             ("open_score", "a detector's name, or null for a closed-set rule")):
            if key not in document:
                raise InputError(f"lacks key '{key}' ({meaning})", path=path)
        name, threshold = document["open_score"], document["threshold"]
        if name is not None and not isinstance(name, str):
            raise InputError("'open_score' must be a detector's name or null", path=path,
                             value=name)
        if name is not None and name not in list_detectors():
            raise InputError(f"unknown open score (valid: {', '.join(list_detectors())})",
                             path=path, value=name)
        if threshold is not None and name is None:
            raise InputError("a threshold needs an open score ('open_score' is null; a "
                             "closed-set rule has threshold null)", path=path, value=threshold)
        tensors_path = directory / DECISION_TENSORS
        recorded = document.get("tensors_sha256")
        if recorded is not None and tensors_path.is_file():
            actual = _file_sha256(tensors_path)
            if actual != recorded:
                raise ForeignTensorsError(
                    f"{DECISION_TENSORS} does not belong to this {DECISION_JSON} (sha256 "
                    f"{actual[:12]}…, the rule was saved with {str(recorded)[:12]}…); refit "
                    f"with `oltr evaluate RUN --data DIR --open` (it fits the rule anew on val "
                    "and saves both files) or put back the run's own file", path=tensors_path)
        try:
            tensors = load_file(str(tensors_path))
        except FileNotFoundError:
            raise InputError("decision rule tensors not found", path=tensors_path) from None
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            raise InputError(f"cannot read decision rule tensors ({exc})",
                             path=tensors_path) from None
        if "train_counts" not in tensors:
            raise InputError("lacks 'train_counts'", path=tensors_path)
        detector = None
        if name is not None:
            try:
                detector = create_detector(name, **document["open_score_options"])
            except (InputError, TypeError, ValueError) as exc:
                raise InputError(f"the open score's options do not fit '{name}' ({exc})",
                                 path=path) from None
            state = {key.removeprefix("detector."): value for key, value in tensors.items()
                     if key.startswith("detector.")}
            try:
                detector.load_state_dict(state)
            except (KeyError, RuntimeError, ValueError) as exc:
                raise InputError(f"the open score's state does not fit '{name}' ({exc})",
                                 path=tensors_path) from None
            if not detector.is_fitted:
                raise InputError(f"the open score '{name}' learns from train data but its "
                                 "state is not in the tensors", path=tensors_path)
        try:
            return cls(
                class_names=list(document["class_names"]),
                train_counts=tensors["train_counts"],
                tau_normalization=float(document["tau_normalization"]),
                logit_adjustment=float(document["logit_adjustment"]),
                open_score=name or "msp",
                detector=detector,
                threshold=threshold,
                open_score_logits=document["open_score_logits"],
                record=document["record"],
            )
        except InputError as exc:  # the rule's own check (DecisionRule.check), with the file
            raise InputError(exc.message, path=path, value=exc.value) from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _detector_inputs(detector: Detector, logits: torch.Tensor, features: torch.Tensor,
                     head: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, Any]:
    """Everything a detector's ``score``/``fit`` may use; each takes what it declares."""
    return {"logits": logits, "features": features, "head": head}


# ---------------------------------------------------------------------- fitting
@dataclass
class SplitOutputs:
    """One split's stored network outputs: model ``logits`` (N, K), direct ``features``
    (N, d) and ``labels`` (N,) (−1 for open images)."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class _FitContext:
    """What fitting reads: the splits' outputs, the linear classifier (τ-normalisation), the
    head (features → logits, for ReAct/ASH/SCALE) and an OLTR model's memory."""

    outputs: Mapping[str, SplitOutputs]
    classifier: torch.nn.Module | None
    head: Callable[[torch.Tensor], torch.Tensor] | None
    centroids: torch.Tensor | None

    def model_logits(self, rule: DecisionRule, split: str) -> torch.Tensor:
        values = self.outputs[split]
        return rule.closed_logits(values.logits, values.features, self.classifier)

    def scores(self, rule: DecisionRule, split: str) -> np.ndarray:
        """The open scores of ``split`` under ``rule``."""
        model = self.model_logits(rule, split)
        logits = rule.adjust(model) if rule.open_score_logits == "decision" else model
        return rule.score(logits, self.outputs[split].features, self.head)

    def fitted(self, name: str, options: Mapping[str, Any], rule: DecisionRule) -> Detector:
        """Detector ``name`` fitted on the train split's outputs where it learns; reachability
        on the model's memory where there is one."""
        if (name == "reachability" and self.centroids is not None and "centroids" not in options
                and options.get("prototypes", 1) == 1):  # prototypes are fitted on train
            options = {**options, "centroids": self.centroids}
        detector = create_detector(name, **options)
        if not detector.is_fitted:
            if "train" not in self.outputs:
                raise InputError(f"open score '{name}' learns from the train split's outputs, "
                                 "which were not given")
            train = self.outputs["train"]
            detector.fit(**_detector_inputs(detector, self.model_logits(rule, "train"),
                                            train.features, self.head), labels=train.labels)
        return detector


def fit_decision_rule(
    eval_cfg: Mapping[str, Any],
    outputs: Mapping[str, SplitOutputs],
    *,
    class_names: Sequence[str],
    train_counts: Sequence[int] | np.ndarray | torch.Tensor,
    classifier: torch.nn.Module | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    centroids: torch.Tensor | None = None,
    open_set: bool = True,
    record: Mapping[str, Any] | None = None,
) -> DecisionRule:
    """Fit every choice of ``eval_cfg`` on val: ``outputs`` holds ``val`` (required),
    ``train`` (for detectors that learn) and ``val_open`` (optional). See the module docstring
    for the objectives. ``centroids``: an OLTR model's memory, which the ``reachability`` open
    score then uses (else the class means of train features). Raises InputError for an
    objective that needs ``val_open`` when it is missing, or a τ-normalisation of a head that
    is not linear."""
    select = eval_cfg.get("select", "balanced_accuracy")
    if select not in SELECT_OBJECTIVES:
        raise InputError(f"eval.select must be one of {', '.join(SELECT_OBJECTIVES)}",
                         value=select)
    val = outputs["val"]
    val_open = outputs.get("val_open")
    if select in ("f_measure", "auroc") and val_open is None:
        raise InputError(f"eval.select: {select} needs a val_open split (curate with "
                         "--val-open N)", value=select)
    context = _FitContext(outputs, classifier, head, centroids)
    rule = DecisionRule(class_names=list(class_names),
                        train_counts=torch.as_tensor(np.asarray(train_counts), dtype=torch.int64),
                        open_score_logits=eval_cfg.get("open_score_logits", "model"),
                        record=dict(record or {}))
    rule.record["select"] = select
    rule.record["val_images"] = len(val)
    rule.record["val_open_images"] = 0 if val_open is None else len(val_open)
    labels = val.labels.numpy()
    _fit_tau_normalization(rule, eval_cfg, context, labels)
    if open_set:  # the open score before the logit adjustment: the F-measure objective needs it
        rule.detector = _fit_open_score(rule, eval_cfg, context, select)
    _fit_logit_adjustment(rule, eval_cfg, context, select, labels)
    if rule.detector is not None:
        _fit_threshold(rule, eval_cfg, context, select)
    return rule


def _fit_tau_normalization(rule: DecisionRule, eval_cfg: Mapping[str, Any],
                           context: _FitContext, labels: np.ndarray) -> None:
    """Set ``rule.tau_normalization``: given, or ``auto``: the value of
    `TAU_NORMALIZATION_GRID` with the best val balanced accuracy. InputError for a
    τ-normalisation of a classifier that is not linear."""
    tau = eval_cfg.get("tau_normalization", 0.0)
    classifier = context.classifier
    if (tau == "auto" or tau != 0) and (
            classifier is None or not isinstance(getattr(classifier, "weight", None), torch.Tensor)):
        raise InputError("τ-normalisation needs a model with a linear classifier on the "
                         "direct feature (no meta-embedding)", value=tau)
    if tau == "auto":
        def tau_objective(value: float) -> float:
            rule.tau_normalization = value
            return balanced_accuracy(context.model_logits(rule, "val"), labels)
        rule.tau_normalization, values = select_on_grid(TAU_NORMALIZATION_GRID, tau_objective)
        rule.record["tau_normalization"] = {
            "source": "selected on val: balanced accuracy", "grid": list(TAU_NORMALIZATION_GRID),
            "objective": values}
    else:
        rule.tau_normalization = float(tau)
        rule.record["tau_normalization"] = {"source": "given"}


def _fit_logit_adjustment(rule: DecisionRule, eval_cfg: Mapping[str, Any],
                          context: _FitContext, select: str, labels: np.ndarray) -> None:
    """Set ``rule.logit_adjustment``: given, or ``auto``: the value of
    `LOGIT_ADJUSTMENT_GRID` with the best val objective (the F-measure at its best threshold
    when ``select`` is ``f_measure``, else balanced accuracy)."""
    la = eval_cfg.get("logit_adjustment", 0.0)
    if la == "auto":
        def la_objective(value: float) -> float:
            rule.logit_adjustment = value
            adjusted = rule.adjust(context.model_logits(rule, "val"))
            if select != "f_measure":
                return balanced_accuracy(adjusted, labels)
            return best_f_threshold(adjusted, labels, context.scores(rule, "val"),
                                    context.scores(rule, "val_open"))[1]
        rule.logit_adjustment, values = select_on_grid(LOGIT_ADJUSTMENT_GRID, la_objective)
        objective = "F-measure" if select == "f_measure" else "balanced accuracy"
        rule.record["logit_adjustment"] = {"source": f"selected on val: {objective}",
                                           "grid": list(LOGIT_ADJUSTMENT_GRID),
                                           "objective": values}
    else:
        rule.logit_adjustment = float(la)
        rule.record["logit_adjustment"] = {"source": "given"}


def _fit_open_score(rule: DecisionRule, eval_cfg: Mapping[str, Any], context: _FitContext,
                    select: str) -> Detector:
    name = eval_cfg.get("open_score", "msp")
    options = dict(eval_cfg.get("open_score_options") or {})
    val_open = context.outputs.get("val_open")
    if name != "auto":
        rule.open_score = name
        rule.record["open_score"] = {"source": "given"}
        return context.fitted(name, options, rule)
    if val_open is None:
        rule.open_score = DEFAULT_OPEN_SCORE
        rule.record["open_score"] = {
            "source": f"default (no val_open split to select on): {DEFAULT_OPEN_SCORE}"}
        return context.fitted(DEFAULT_OPEN_SCORE, {}, rule)
    candidates = list(eval_cfg.get("open_score_candidates") or AUTO_OPEN_SCORES)
    results: dict[str, float] = {}
    fitted: dict[str, Detector] = {}
    labels = context.outputs["val"].labels.numpy()
    for candidate in candidates:
        try:  # a candidate that does not apply (ViM on a head that is not linear, ASH on
            detector = context.fitted(  # negative features) is skipped
                candidate, AUTO_CANDIDATE_OPTIONS.get(candidate, {}), rule)
            rule.detector, rule.open_score = detector, candidate
            known, opened = context.scores(rule, "val"), context.scores(rule, "val_open")
        except InputError as exc:
            results[candidate] = float("nan")
            rule.record.setdefault("open_score_skipped", {})[candidate] = str(exc)
            continue
        if select == "f_measure":
            logits = rule.adjust(context.model_logits(rule, "val"))
            results[candidate] = best_f_threshold(logits, labels, known, opened)[1]
        else:
            is_open = np.concatenate([np.zeros(len(known), bool), np.ones(len(opened), bool)])
            results[candidate] = metrics.auroc(np.concatenate([known, opened]), is_open)
        fitted[candidate] = detector
    finite = {k: v for k, v in results.items() if not math.isnan(v)}
    if not finite:
        raise InputError("no open-score candidate could be fitted", value=candidates)
    best = max(finite.values())
    winner = next(c for c in candidates if c in finite and finite[c] >= best - 1e-12)
    rule.open_score = winner
    rule.record["open_score"] = {
        "source": f"selected on val_open: {'F-measure' if select == 'f_measure' else 'AUROC'}",
        "candidates": candidates, "objective": [results[c] for c in candidates]}
    return fitted[winner]


def msp_probability_threshold(probability: float, open_score: str, *, instead: str) -> float:
    """The open-score threshold that answers "unknown" when the top softmax probability is below
    ``probability`` (the paper's 0.1; ``--threshold`` of ``oltr evaluate`` and ``oltr
    predict``): the msp score is 1 − max p, so ``1 − probability``.

    Raises InputError: ``open_score`` is not msp (the message ends with ``instead``)."""
    if open_score != "msp":
        raise InputError(f"a probability threshold applies to the msp open score only; {instead}",
                         value=probability)
    return 1.0 - float(probability)


def _fit_threshold(rule: DecisionRule, eval_cfg: Mapping[str, Any], context: _FitContext,
                   select: str) -> None:
    probability = eval_cfg.get("threshold")
    known = context.scores(rule, "val")
    if probability is not None:
        rule.threshold = msp_probability_threshold(
            probability, rule.open_score, instead="leave eval.threshold null to calibrate on val")
        rule.record["threshold"] = {
            "source": f"probability {probability}: reject when max softmax < {probability}"}
        return
    if select == "f_measure":
        logits = rule.adjust(context.model_logits(rule, "val"))
        rule.threshold, value = best_f_threshold(logits, context.outputs["val"].labels.numpy(),
                                                 known, context.scores(rule, "val_open"))
        rule.record["threshold"] = {"source": "selected on val: F-measure on val ∪ val_open",
                                    "objective": value}
        return
    accept_rate = float(eval_cfg.get("accept_rate", 0.95))
    rule.threshold = metrics.calibrate_threshold(known, accept_rate)
    rule.record["threshold"] = {
        "source": f"calibrated on val: accepts {accept_rate:.0%} of known val images"}
