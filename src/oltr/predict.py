"""Predict the class of new images — or answer "unknown" (label -1) — with a trained run.

A :class:`Predictor` holds a trained network, the preprocessing its ``model.json`` describes
(image size, channels, normalisation; images of any size, RGB or grayscale, are converted as
training did, by the one image loader `oltr.data.images.load_image`) and the run's decision
rule (`oltr.decision`, ``decision.json``: τ-normalisation, logit adjustment, the open score
with its fitted state, the threshold) — fitted on val when the run was trained, so no test
split is needed. The rule is used only with the weights it was fitted for.

    predictor = Predictor.from_run("runs/oltr")
    predictor.predict(["a.png", PIL.Image.open("b.jpg"), torch.rand(1, 28, 28)])

``oltr predict RUN PATH…`` does the same from the shell over files and folders (recursively),
printing a table, JSON lines or CSV; an unreadable or non-image file is reported by name and
the others go on.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oltr.artifact import classifier_of, saved_rule
from oltr.data import build_transform
from oltr.data.images import as_seen, load_image
from oltr.data.loader import first_size_mismatch, size_mismatch_message
from oltr.data.paths import IMAGE_EXTENSIONS, walk_images
from oltr.decision import DECISION_JSON, DecisionRule, msp_probability_threshold
from oltr.detectors.head import network_head
from oltr.errors import InputError
from oltr.inference import load_model
from oltr.io import EMPTY_PATH
from oltr.ownership import marker_kind
from oltr.run import RunDir
from oltr.runtime import autocast, select_device

UNKNOWN = "unknown"
ImageInput = str | Path | Image.Image | torch.Tensor | np.ndarray


@dataclass
class Prediction:
    """The answer for one image: ``label`` (−1 = unknown) and its name, the closed-set class
    the model would pick, ``confidence`` (max softmax of the decision logits, in [0, 1]),
    ``open_score`` (higher = more open; "unknown" when above ``threshold``) and the ``top_k``
    classes with their probabilities. ``error`` names why an input could not be read (then
    every other field is None)."""

    source: str
    label: int | None = None
    label_name: str | None = None
    closed_set_label: str | None = None
    confidence: float | None = None
    open_score: float | None = None
    threshold: float | None = None
    top_k: list[tuple[str, float]] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.source, "label": self.label, "label_name": self.label_name,
                "closed_set_label": self.closed_set_label, "confidence": self.confidence,
                "open_score": self.open_score, "threshold": self.threshold,
                "top_k": None if self.top_k is None else
                [{"label_name": name, "probability": p} for name, p in self.top_k],
                "error": self.error}


class Predictor:
    """A trained network, its preprocessing and its decision rule (see the module docstring).

    ``threshold`` replaces the rule's (in open-score units: "unknown" when the score exceeds
    it); ``amp`` is ``eval.amp`` (fp32 by default)."""

    def __init__(self, net: torch.nn.Module, info: dict[str, Any], rule: DecisionRule, *,
                 device: torch.device, threshold: float | None = None, amp: str = "off") -> None:
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(
                threshold, numbers.Real) or not math.isfinite(threshold)):
            raise InputError("the open-score threshold must be a finite number", value=threshold)
        if rule.class_names != info["class_names"]:
            raise InputError("the decision rule's classes differ from the model's",
                             value=rule.class_names[:5])
        self.net, self.info, self.rule, self.device, self.amp = net.eval(), info, rule, device, amp
        self.threshold = rule.threshold if threshold is None else float(threshold)
        self.classifier, self.head = classifier_of(net), network_head(net)
        data = info["data"]
        self.mode = "L" if data["channels"] == 1 else "RGB"
        self.transform = build_transform(data["transform"], train=False,
                                         image_size=data["image_size"], channels=data["channels"],
                                         mean=data["mean"], std=data["std"])

    def use_msp_probability(self, probability: float) -> None:
        """Answer "unknown" when the top probability is below ``probability`` ∈ [0, 1]: the
        meaning of ``--threshold`` in ``oltr evaluate`` (the paper's 0.1). The msp open score is
        1 − max p, so the open-score threshold becomes ``1 − probability``.

        Raises InputError: ``probability`` outside [0, 1]; the rule's open score is not msp
        (then the threshold is in that score's units: ``threshold=`` / ``--open-threshold``)."""
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) \
                or not 0.0 <= probability <= 1.0:
            raise InputError("a probability threshold must lie in [0, 1]", value=probability)
        self.threshold = msp_probability_threshold(
            probability, self.rule.open_score,
            instead=f"this run's rule uses {self.rule.open_score}: give --open-threshold in its "
                    f"units (the rule's own is {self.rule.threshold!r})")

    @classmethod
    def from_artifact(cls, directory: str | Path, *, device: str = "auto",
                      threshold: float | None = None, amp: str = "off",
                      weights_dir: str | Path | None = None) -> Predictor:
        """The predictor of a folder holding ``model.safetensors``, ``model.json`` and the
        decision rule (``decision.json`` + ``decision.safetensors``); ``weights_dir``: where
        the weights are when the rule lies elsewhere (a run: the rule in ``RUN/``, the
        weights in its final stage). InputError naming the file when the rule is missing or
        belongs to other weights."""
        directory = Path(directory)
        torch_device = select_device(device)
        net, info = load_model(Path(weights_dir) if weights_dir is not None else directory,
                               torch_device)
        rule = saved_rule(directory, info)
        if rule is None and marker_kind(directory) == "stage":
            raise InputError(
                f"a stage folder of the run {directory.parent}: its decision rule lives in the "
                f"run, for its final stage; pass {directory.parent} (or evaluate this stage's "
                f"weights with `oltr evaluate {directory} --data DIR --open`)", path=directory)
        if rule is None:
            raise InputError("no decision rule (trained by an older oltr, or stopped before "
                             "its end): run `oltr evaluate RUN --data DIR --open` once to fit it on val "
                             "and save it with the run",
                             path=directory / DECISION_JSON)
        return cls(net, info, rule, device=torch_device, threshold=threshold, amp=amp)

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto",
                 threshold: float | None = None) -> Predictor:
        """The predictor of a trained run: its final stage's weights and the run's decision
        rule (see :meth:`from_artifact`)."""
        run = RunDir(run_dir)
        amp = run.stage_config()["eval"]["amp"]
        return cls.from_artifact(run_dir, device=device, threshold=threshold, amp=amp,
                                 weights_dir=run.final_stage().path)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One input as the model's normalised (C, H, W) tensor: a path (read as a person
        sees it), a PIL image, a tensor — (C, H, W) or (H, W), uint8 in 0–255 or float in
        [0, 1] — or a NumPy array in image layout — (H, W) or (H, W, C) with C = 1 or 3 (RGB
        order; OpenCV's BGR must be flipped first), uint8 or float in [0, 1] — converted,
        resized and normalised as training's evaluation transform does. InputError for any
        other shape, dtype or range."""
        if isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[2] in (1, 3):
                image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            elif image.ndim == 2:
                image = torch.from_numpy(np.ascontiguousarray(image))
            else:
                raise InputError("a NumPy image must be (H, W) or (H, W, C) with 1 or 3 "
                                 "channels", value=tuple(image.shape))
            if not (image.dtype == torch.uint8 or image.is_floating_point()):
                raise InputError("a NumPy image must be uint8 (0–255) or float in [0, 1]",
                                 value=str(image.dtype))
        if isinstance(image, (str, Path)):
            return self.transform(load_image(image, self.mode))
        if isinstance(image, Image.Image):
            return self.transform(as_seen(image, "<PIL image>").convert(self.mode))
        if isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            if tensor.ndim == 2:
                tensor = tensor.unsqueeze(0)
            if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
                raise InputError("an image tensor must be (C, H, W) with 1 or 3 channels, or "
                                 "(H, W)", value=tuple(image.shape))
            if tensor.dtype == torch.uint8:
                array = tensor.permute(1, 2, 0).numpy()
            else:
                if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
                    raise InputError("a float image tensor must hold values in [0, 1]")
                array = (tensor.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            return self.transform(pil.convert(self.mode))
        raise InputError("an image must be a path, a PIL image, a tensor or a NumPy array",
                         value=type(image).__name__)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """The rule on a preprocessed batch (B, C, H, W): ``prediction`` (−1 = unknown),
        ``closed_prediction``, ``open_score``, ``probabilities`` (B, K) of the decision
        logits."""
        with autocast(self.amp, self.device):
            out = self.net(images.to(self.device))
        decided = self.rule.apply(out.logits.float().cpu(), out.features.float().cpu(),
                                  classifier=self.classifier, head=self.head)
        scores = np.asarray(decided["open_score"], dtype=np.float64)
        closed = decided["closed_prediction"].numpy()
        if self.threshold == self.rule.threshold:  # the rule's own answer (DecisionRule.compose)
            prediction = decided["prediction"].numpy()
        else:  # a threshold given in place of the rule's
            prediction = np.where(scores > self.threshold, -1, closed) \
                if self.threshold is not None else closed
        return {"prediction": prediction, "closed_prediction": closed, "open_score": scores,
                "probabilities": decided["logits"].double().softmax(dim=1).numpy()}

    def predict(self, images: Sequence[ImageInput] | torch.Tensor, *, batch_size: int = 64,
                top_k: int = 3, names: Sequence[str] | None = None) -> list[Prediction]:
        """One :class:`Prediction` per input: a sequence of paths, PIL images, tensors or arrays
        ((C, H, W) or (H, W), see :meth:`preprocess`), one such input alone (a list of one
        Prediction), or a (B, C, H, W) float batch already preprocessed (normalised, the
        model's channels and image size; checked). An input that cannot be read becomes a
        Prediction with ``error`` set; the others go on. ``names``: what each input is called
        in the results, one per input (default: its path, or ``#i``). InputError for a batch
        of the wrong shape or dtype, or ``names`` of another length."""
        if isinstance(images, (str, Path, Image.Image)) or (
                isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim in (2, 3)):
            images = [images]  # one image, not a sequence of its rows or characters
        if isinstance(images, torch.Tensor):
            batch = self._checked_batch(images)
            if names is not None and len(names) != len(batch):
                raise InputError(f"names: one per input ({len(batch)}), got {len(names)}")
            rows: list[Prediction] = []
            for start in range(0, len(batch), batch_size):
                results = self.predict_batch(batch[start:start + batch_size])
                rows += [self._row(names[start + i] if names else f"#{start + i}", results, i,
                                   top_k) for i in range(len(results["prediction"]))]
            return rows
        items = list(images)
        if names is not None and len(names) != len(items):
            raise InputError(f"names: one per input ({len(items)}), got {len(names)}")
        labels = list(names) if names is not None else [
            str(item) if isinstance(item, (str, Path)) else f"#{i}" for i, item in enumerate(items)]
        slots: list[Prediction | None] = [None] * len(items)
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if not pending:
                return
            tensors = [tensor for _, tensor in pending]
            bad = first_size_mismatch(tensors)
            if bad is not None:
                raise InputError(size_mismatch_message(labels[pending[bad][0]], tensors[bad].shape,
                                                       labels[pending[0][0]], tensors[0].shape))
            results = self.predict_batch(torch.stack(tensors))
            for row, (index, _) in enumerate(pending):
                slots[index] = self._row(labels[index], results, row, top_k)
            pending.clear()

        for index, item in enumerate(items):
            try:
                pending.append((index, self.preprocess(item)))
            except InputError as exc:
                slots[index] = Prediction(labels[index], error=str(exc))
            if len(pending) == batch_size:
                flush()
        flush()
        return [row for row in slots if row is not None]

    def _checked_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """A preprocessed (B, C, H, W) batch as float32, or InputError naming what does not
        fit the model (dtype, channels, image size)."""
        data = self.info["data"]
        expected = (data["channels"], data["image_size"], data["image_size"])
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise InputError(f"a preprocessed batch must be (B, {', '.join(map(str, expected))})"
                             " for this model (its channels and image size; channels first); "
                             "pass images unprocessed as a list to have them preprocessed",
                             value=tuple(batch.shape))
        if not batch.is_floating_point():
            raise InputError("a preprocessed batch must be float (normalised as training's "
                             "evaluation transform does); pass uint8 images as a list",
                             value=str(batch.dtype))
        return batch.float()

    def predict_paths(self, paths: Sequence[str | Path], batch_size: int = 64,
                      top_k: int = 3) -> list[dict[str, Any]]:
        """:meth:`predict` over image files, as dicts (``path``, ``label``, ``label_name``, …)."""
        return [row.as_dict() for row in self.predict(list(paths), batch_size=batch_size,
                                                      top_k=top_k)]

    def _row(self, source: str, results: dict[str, np.ndarray], i: int, top_k: int
             ) -> Prediction:
        names = self.info["class_names"]
        label = int(results["prediction"][i])
        probabilities = results["probabilities"][i]
        order = np.argsort(-probabilities, kind="stable")[:max(1, top_k)]
        return Prediction(
            source=source, label=label, label_name=UNKNOWN if label == -1 else names[label],
            closed_set_label=names[int(results["closed_prediction"][i])],
            confidence=float(probabilities.max()), open_score=float(results["open_score"][i]),
            threshold=self.threshold,
            top_k=[(names[int(k)], float(probabilities[k])) for k in order])


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders replaced by every image under them (recursively, sorted, links
    followed without loops: `oltr.data.paths.walk_images`). A missing path is kept, so that it
    is reported by name with the others."""
    expanded: list[Path] = []
    for given in paths:
        if not str(given).strip():  # Path("") is "." (every image here): an unset variable
            raise InputError(EMPTY_PATH, value=str(given))
        path = Path(given)
        if path.is_dir():
            images = walk_images(path, allow_outside_root=True)
            if not images:
                raise InputError(f"the folder holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                                 path=path)
            expanded += images
        else:
            expanded.append(path)
    return expanded
