"""Predict the class of new images, or answer "unknown" (label -1) when the open score is too high.

The threshold comes from the run's evaluation report (calibrated on the known-only val split) or
is given explicitly; the open score follows the package convention (higher = more open). A
report is used only with the weights it was computed from (its ``weights.sha256`` equals the
sha256 of the run's ``model.safetensors``); otherwise predict asks to re-run ``oltr evaluate``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oltr.data import build_transform
from oltr.data.images import load_image
from oltr.data.loader import first_size_mismatch, size_mismatch_message
from oltr.engine import WEIGHTS, autocast_context, final_stage_dir, load_model, select_device
from oltr.errors import InputError
from oltr.evaluate import adjust_logits, run_stage_config, tau_normalized_logits
from oltr.io import read_json_object
from oltr.openset import OPEN_SCORES, compute_open_score, msp_score

UNKNOWN = "unknown"


def _report_number(section: dict[str, Any], key: str, name: str, path: Path) -> float:
    """``section[key]`` as a finite number; InputError naming the report and ``name`` else."""
    if key not in section:
        raise InputError(f"the report lacks key '{name}' (edited? re-run `oltr evaluate`)",
                         path=path)
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"report key '{name}' must be a finite number (edited? re-run "
                         "`oltr evaluate`)", path=path, value=value)
    return float(value)


def _check_report_weights(report: dict[str, Any], path: Path, weights: Path,
                          info: dict[str, Any]) -> None:
    """InputError unless ``report`` was computed from the weights loaded (same sha256)."""
    record = report.get("weights")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise InputError("the report does not say which weights it was computed from (written "
                         "by an older oltr, or edited): re-run `oltr evaluate`", path=path)
    if record["sha256"] != info["weights_sha256"]:
        raise InputError(f"the report was computed from other weights (epoch "
                         f"{record.get('epoch')}) than {weights} now holds (epoch "
                         f"{info.get('epoch')}): its threshold does not apply; re-run "
                         "`oltr evaluate`", path=path)


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
        """Load a run; the threshold and decision rule default to those in ``RUN/report.json``,
        which must have been computed from the run's present weights. InputError naming the
        report and key when it is stale, damaged or lacks what is needed."""
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(
                threshold, (int, float)) or not math.isfinite(threshold)):
            raise InputError("the open-score threshold must be a finite number", value=threshold)
        torch_device = select_device(device)
        stage_dir = final_stage_dir(run_dir)
        net, info = load_model(stage_dir, torch_device)
        report_path = Path(run_dir) / "report.json"
        report = (read_json_object(report_path, "evaluation report")
                  if report_path.exists() else None)
        if report is not None:
            _check_report_weights(report, report_path, stage_dir / WEIGHTS, info)
        if threshold is None:
            if report is None:
                raise InputError("no open-set threshold: evaluate the run first "
                                 "(`oltr evaluate RUN --data DIR --open`) or pass --threshold",
                                 path=report_path)
            # a benchmark without open classes evaluated with --open-set has no "open" section;
            # its external open sets share the one val-calibrated threshold
            section = report.get("open") or next(iter((report.get("open_sets") or {}).values()),
                                                 None)
            if not isinstance(section, dict):
                raise InputError("the report has no open-set section; re-run evaluate with --open",
                                 path=report_path)
            stored_score = section.get("open_score")
            if not isinstance(stored_score, str) or stored_score not in OPEN_SCORES:
                raise InputError(f"report key 'open.open_score' must be one of "
                                 f"{', '.join(OPEN_SCORES)}", path=report_path, value=stored_score)
            if open_score not in (None, stored_score):
                raise InputError(f"the report's threshold belongs to the open score "
                                 f"'{stored_score}'; pass --threshold for "
                                 f"'{open_score}'", value=open_score)
            open_score = stored_score
            threshold = _report_number(section, "threshold", "open.threshold", report_path)
        eval_cfg = run_stage_config(run_dir)["eval"]
        rule = {}
        for key in ("logit_adjustment", "tau_normalization"):
            value = eval_cfg[key]
            if report is not None and key in report:  # what the evaluation decided with
                value = _report_number(report, key, key, report_path)
            if value == "auto":  # selected on val by `oltr evaluate`, stored in its report
                raise InputError(f"{key} is auto: evaluate the run first so that its τ is "
                                 "selected on val", path=report_path)
            rule[key] = float(value)
        open_score_logits = (report or {}).get("open_score_logits",
                                               eval_cfg["open_score_logits"])
        if open_score_logits not in ("model", "decision"):
            raise InputError("report key 'open_score_logits' must be model or decision",
                             path=report_path, value=open_score_logits)
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
