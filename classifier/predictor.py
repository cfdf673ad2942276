"""Deployable artefacts of a trained classifier and the :class:`Predictor` a service loads from them.

A model folder holds ``model.safetensors`` (the weights), ``config.json`` (the classifier config, the backbone's
architecture and preprocessing, the head's shape, the calibration), ``labels.txt`` (one class a line, output order),
``feature_schema.json`` (the metadata branch's input, when there is one) and ``metrics.json`` (written from the
gate record). :meth:`Predictor.from_dir` rebuilds everything from ``config.json`` alone - no registry lookup, no
Hub access - loads the weights strictly and answers image + metadata -> top-k classes with temperature-scaled
probabilities, an abstain flag and a conformal prediction set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .backbones import rebuild_feature_backbone
from .calibrate import Calibration
from .config import ClassifierConfig
from .model import LesionClassifier, preprocess_images

__all__ = ["save_model_dir", "Predictor", "Prediction", "FORMAT", "ModelDirError"]

FORMAT = "covtoken.classifier/1"
_FILES = ("model.safetensors", "config.json", "labels.txt")


class ModelDirError(ValueError):
    """A model folder that is incomplete or inconsistent (names the file)."""


def _head_shape(model: LesionClassifier) -> dict:
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    dropout = next(m.p for m in model.head if isinstance(m, torch.nn.Dropout))
    return {"n_classes": linears[-1].out_features, "meta_dim": model.meta_dim,
            "meta_hidden": model.meta[0].out_features if model.meta is not None else 0,
            "head_hidden": linears[0].out_features if len(linears) > 1 else 0, "dropout": float(dropout)}


def save_model_dir(folder: str | Path, *, model: LesionClassifier, cfg: ClassifierConfig, calibration: Calibration,
                   metrics: Mapping[str, Any] | None = None, run_id: str | None = None) -> dict[str, str]:
    """Write the artefact folder; returns ``{file: "sha256:..."}`` of what was written."""
    from safetensors.torch import save_file

    from ..record import dumps_strict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT, "run_id": str(run_id)})
    doc = dict(cfg.doc)
    doc["metadata"] = {"feature_schema": "feature_schema.json" if cfg.feature_schema else None}
    bb = model.backbone
    config = {"format": FORMAT, "run_id": run_id, "classifier": doc, "labels": cfg.labels,
              "backbone": {"name": cfg.backbone["name"], "arch": bb.arch_config, "data_config": bb.data_config,
                           "source": bb.source},
              "model": _head_shape(model), "calibration": calibration.as_dict()}
    (folder / "config.json").write_text(dumps_strict(config) + "\n", encoding="utf-8")
    (folder / "labels.txt").write_text("\n".join(cfg.labels) + "\n", encoding="utf-8")
    if cfg.feature_schema:
        (folder / "feature_schema.json").write_text(dumps_strict(cfg.feature_schema.as_dict()) + "\n",
                                                    encoding="utf-8")
    if metrics is not None:
        (folder / "metrics.json").write_text(dumps_strict(dict(metrics)) + "\n", encoding="utf-8")
    return {p.name: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@dataclass(frozen=True)
class Prediction:
    top_k: list[tuple[str, float]]     # (class, temperature-scaled probability), most probable first
    abstain: bool                      # max probability below the calibrated threshold
    prediction_set: list[str]          # conformal set at 1 - alpha (may be empty or every class)

    def as_dict(self) -> dict:
        return {"top_k": [{"label": c, "probability": p} for c, p in self.top_k], "abstain": self.abstain,
                "prediction_set": self.prediction_set}


class Predictor:
    """A trained classifier rebuilt from its folder. Use :meth:`from_dir`."""

    def __init__(self, model: LesionClassifier, cfg: ClassifierConfig, calibration: Calibration, labels: list[str],
                 data_config: dict, *, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.cfg = cfg
        self.calibration = calibration
        self.labels = labels
        self.data_config = data_config
        self.device = device

    @classmethod
    def from_dir(cls, folder: str | Path, *, device: str = "cpu") -> "Predictor":
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [f for f in _FILES if not (folder / f).is_file()]
        if missing:
            raise ModelDirError(f"{folder}: missing {missing}")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("format") != FORMAT:
            raise ModelDirError(f"{folder}/config.json: format {config.get('format')!r}, expected {FORMAT!r}")
        fs = config["classifier"]["metadata"]["feature_schema"]
        if fs is not None and not (folder / fs).is_file():
            raise ModelDirError(f"{folder}: config.json names {fs} but it is missing")
        cfg = ClassifierConfig.from_dict(config["classifier"], source=str(folder / "config.json"), base=folder)
        labels = (folder / "labels.txt").read_text(encoding="utf-8").split("\n")
        labels = [x for x in labels if x]
        if labels != cfg.labels or labels != config["labels"]:
            raise ModelDirError(f"{folder}/labels.txt {labels} disagrees with config.json {cfg.labels}")
        shape = config["model"]
        if shape["meta_dim"] != cfg.meta_dim:
            raise ModelDirError(f"{folder}: feature_schema.json encodes {cfg.meta_dim} columns, the model expects "
                                f"{shape['meta_dim']}")
        bb = rebuild_feature_backbone(config["backbone"]["arch"], config["backbone"]["data_config"])
        model = LesionClassifier(bb, n_classes=shape["n_classes"], meta_dim=shape["meta_dim"],
                                 meta_hidden=shape["meta_hidden"] or 1, head_hidden=shape["head_hidden"],
                                 dropout=shape["dropout"])
        state = load_file(str(folder / "model.safetensors"))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelDirError(f"{folder}/model.safetensors does not match config.json: {exc}") from None
        return cls(model, cfg, Calibration.from_dict(config["calibration"]), labels, config["backbone"]["data_config"],
                   device=device)

    def encode_metadata(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        if self.cfg.feature_schema is None:
            return None
        return torch.from_numpy(self.cfg.feature_schema.encode(rows))

    @torch.inference_mode()
    def logits(self, images: Sequence[np.ndarray], metadata: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``(n, C)`` raw logits (before temperature)."""
        if len(images) != len(metadata):
            raise ValueError(f"{len(images)} images but {len(metadata)} metadata rows")
        x = preprocess_images(images, self.data_config).to(self.device)
        meta = self.encode_metadata(metadata)
        return self.model(x, None if meta is None else meta.to(self.device)).float().cpu().numpy()

    def predict(self, images: Sequence[np.ndarray], metadata: Sequence[Mapping[str, Any]], *,
                k: int | None = None) -> list[Prediction]:
        k = int(k or self.cfg.doc["top_k"])
        z = self.logits(images, metadata).astype(np.float64) / self.calibration.temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        out = []
        for row in p:
            order = np.argsort(-row, kind="stable")[:k]
            out.append(Prediction(top_k=[(self.labels[i], float(row[i])) for i in order],
                                  abstain=bool(row.max() < self.calibration.abstain_threshold),
                                  prediction_set=[self.labels[i] for i in range(len(row))
                                                  if 1.0 - row[i] <= self.calibration.conformal_qhat]))
        return out
