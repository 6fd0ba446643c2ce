"""Predict the class of new images, or answer "unknown" (label -1) when the open score is too high.

The threshold comes from the run's evaluation report (calibrated on the known-only val split) or
is given explicitly; the open score follows the package convention (higher = more open).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oltr.data import build_transform
from oltr.data.images import load_image
from oltr.data.loader import first_size_mismatch, size_mismatch_message
from oltr.engine import autocast_context, final_stage_dir, load_model, select_device
from oltr.errors import InputError
from oltr.evaluate import adjust_logits, run_stage_config, tau_normalized_logits
from oltr.io import read_json_object
from oltr.openset import compute_open_score, msp_score

UNKNOWN = "unknown"


class Predictor:
    """A trained network + its eval transform + an open-set rejection rule."""

    def __init__(self, net: torch.nn.Module, info: dict[str, Any], *, open_score: str,
                 threshold: float, device: torch.device, logit_adjustment: float = 0.0,
                 tau_normalization: float = 0.0, open_score_logits: str = "model",
                 amp: str = "off") -> None:
        self.net, self.info, self.device = net, info, device
        self.open_score_logits = open_score_logits
        self.amp = amp
        self.logit_adjustment, self.tau_normalization = logit_adjustment, tau_normalization
        self.open_score, self.threshold = open_score, threshold
        data = info["data"]
        self.mode = "L" if data["channels"] == 1 else "RGB"
        self.transform = build_transform(data["transform"], train=False,
                                         image_size=data["image_size"], channels=data["channels"],
                                         mean=data["mean"], std=data["std"])

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", open_score: str | None = None,
                 threshold: float | None = None) -> Predictor:
        """Load a run; the threshold defaults to the one in ``RUN/report.json``."""
        torch_device = select_device(device)
        stage_dir = final_stage_dir(run_dir)
        net, info = load_model(stage_dir, torch_device)
        report_path = Path(run_dir) / "report.json"
        report = (read_json_object(report_path, "evaluation report")
                  if report_path.exists() else None)
        if threshold is None:
            if report is None:
                raise InputError("no open-set threshold: evaluate the run first "
                                 "(`oltr evaluate RUN --data DIR --open`) or pass --threshold",
                                 path=report_path)
            # a benchmark without open classes evaluated with --open-set has no "open" section;
            # its external open sets share the one val-calibrated threshold
            section = report.get("open") or next(iter((report.get("open_sets") or {}).values()),
                                                 None)
            if section is None:
                raise InputError("the report has no open-set section; re-run evaluate with --open",
                                 path=report_path)
            if open_score not in (None, section["open_score"]):
                raise InputError(f"the report's threshold belongs to the open score "
                                 f"'{section['open_score']}'; pass --threshold for "
                                 f"'{open_score}'", value=open_score)
            open_score = section["open_score"]
            threshold = float(section["threshold"])
        eval_cfg = run_stage_config(run_dir)["eval"]
        rule = {}
        for key in ("logit_adjustment", "tau_normalization"):
            value = eval_cfg[key]
            if report is not None and key in report:  # what the evaluation decided with
                value = report[key]
            if value == "auto":  # selected on val by `oltr evaluate`, stored in its report
                raise InputError(f"{key} is auto: evaluate the run first so that its τ is "
                                 "selected on val", path=report_path)
            rule[key] = float(value)
        open_score_logits = (report or {}).get("open_score_logits",
                                               eval_cfg["open_score_logits"])
        return cls(net, info, open_score=open_score or "msp", threshold=threshold,
                   device=torch_device, open_score_logits=open_score_logits,
                   amp=eval_cfg["amp"], **rule)

    def _load(self, path: str | Path) -> torch.Tensor:
        """The preprocessed image (read by `oltr.data.images.load_image`; ImageError naming
        the file when it is missing, unreadable or in a mode oltr cannot read)."""
        return self.transform(load_image(path, self.mode))

    def _batch(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """The preprocessed images of ``paths`` as one batch; InputError naming the first image
        whose size differs from the first's (``data.transform: none``)."""
        images = [self._load(path) for path in paths]
        bad = first_size_mismatch(images)
        if bad is not None:
            raise InputError(size_mismatch_message(paths[bad], images[bad].shape, paths[0],
                                                   images[0].shape))
        return torch.stack(images)

    @torch.no_grad()
    def predict_tensor(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Logits-level prediction of a preprocessed batch: labels (-1 = unknown) and scores."""
        self.net.eval()
        with autocast_context(self.amp, self.device):
            out = self.net(images.to(self.device))
        features = out["features"].float().cpu().numpy()
        logits = out["logits"].float().cpu().numpy()
        if self.tau_normalization:
            classifier = self.net.classifier
            logits = tau_normalized_logits(
                features, classifier.weight.detach().float().cpu().numpy(),
                classifier.bias.detach().float().cpu().numpy(), self.tau_normalization)
        model_logits = logits
        logits = adjust_logits(logits, np.asarray(self.info["train_counts"]),
                               self.logit_adjustment)
        if self.open_score_logits == "decision":
            model_logits = logits
        centroids = None
        if getattr(self.net, "meta_embedding", None) is not None:
            centroids = self.net.meta_embedding.centroids.detach().float().cpu().numpy()
        scores = compute_open_score(self.open_score, logits=model_logits, features=features,
                                    centroids=centroids)
        labels = np.where(scores > self.threshold, -1, logits.argmax(axis=1))
        return {"labels": labels, "open_scores": scores,
                "confidence": 1.0 - msp_score(logits), "closed_labels": logits.argmax(axis=1)}

    def predict_paths(self, paths: Sequence[str | Path], batch_size: int = 64) -> list[dict]:
        """One dict per image: path, label (-1 = unknown), label_name, confidence, open_score."""
        rows: list[dict[str, Any]] = []
        names = self.info["class_names"]
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            result = self.predict_tensor(self._batch(chunk))
            for i, path in enumerate(chunk):
                label = int(result["labels"][i])
                rows.append({
                    "path": str(path),
                    "label": label,
                    "label_name": UNKNOWN if label == -1 else names[label],
                    "closed_set_label": names[int(result["closed_labels"][i])],
                    "confidence": float(result["confidence"][i]),
                    "open_score": float(result["open_scores"][i]),
                })
        return rows
