"""The G9 protocol up to (not including) the judged metrics: train the arms, calibrate the headline model.

Roles (patient splits): ``train`` fits every arm (the only labels training sees), ``calib`` fits temperature,
conformal quantile and abstain threshold of the headline arm, ``test`` is judged. :func:`fit_stage` opens labels
through ``covtoken.eval.classification.open_class_labels`` for ``train`` and ``calib`` only and returns test logits
without ever reading a test label; ``tests/test_g9_leak.py`` permutes and zeroes test labels and requires every
output of this stage bit-identical.

Arms: ``configured`` (the config's backbone and reduced questionnaire: the headline and deployed model),
``full`` (the same with the full questionnaire: C2), ``baseline`` (the baseline config, e.g. ResNet-50 with the same
reduced questionnaire: C1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .backbones import build_feature_backbone
from .calibrate import Calibration, fit_calibration
from .config import ClassifierConfig
from .model import LesionClassifier, preprocess_images, tta_views
from .train import TrainResult, predict_logits, train_classifier

__all__ = ["Arm", "FitStage", "fit_stage", "sample_other", "build_arm_model"]

log = logging.getLogger("covtoken.classifier.experiment")


@dataclass
class Arm:
    name: str
    cfg: ClassifierConfig
    trained: TrainResult | None = None
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (n, C); "test/<view>" for TTA views


@dataclass
class FitStage:
    arms: dict[str, Arm]
    ids: dict[str, list[str]]           # split -> image ids (row order of the logits)
    patients: dict[str, list[str]]      # split -> patient id of each image
    train_rows: list[str]               # image ids actually trained on (after sampling "other")
    calibration: Calibration


def sample_other(y: np.ndarray, other: int, fraction: float, seed: int) -> np.ndarray:
    """Indices kept for training: every listed class, and a seeded ``fraction`` of the ``other`` class."""
    idx_other = np.nonzero(y == other)[0]
    keep_n = int(round(fraction * len(idx_other)))
    rng = np.random.default_rng(seed)
    kept = np.sort(rng.choice(idx_other, size=keep_n, replace=False)) if keep_n else np.array([], dtype=int)
    return np.sort(np.concatenate([np.nonzero(y != other)[0], kept])).astype(np.int64)


def build_arm_model(cfg: ClassifierConfig, *, weights: str | None = None, revision: str | None = None,
                    seed: int = 0) -> LesionClassifier:
    bb = build_feature_backbone(cfg.backbone["name"], weights=weights,
                                revision=revision or cfg.backbone.get("revision"))
    torch.manual_seed(seed)  # the head and metadata branch start from the run's seed
    head = cfg.doc["head"]
    return LesionClassifier(bb, n_classes=len(cfg.labels), meta_dim=cfg.meta_dim, meta_hidden=int(head["meta_hidden"]),
                            head_hidden=int(head["hidden"]), dropout=float(head["dropout"]))


def _meta(cfg: ClassifierConfig, items: Sequence[Any]) -> torch.Tensor | None:
    if cfg.feature_schema is None:
        return None
    return torch.from_numpy(cfg.feature_schema.encode([it.meta for it in items], ids=[it.image_id for it in items]))


def fit_stage(data: Any, splits: Mapping[str, Sequence[str]], arms: Mapping[str, ClassifierConfig], *, seed: int,
              device: str = "cpu", weights: Mapping[str, str | None] | None = None,
              revisions: Mapping[str, str | None] | None = None, calibrate_on: str = "calib",
              batch_size: int = 64, on_backbone: Callable[[str, Any], None] | None = None) -> FitStage:
    """Train every arm on ``train`` patients, compute logits on ``calib`` and ``test`` (TTA views of the headline
    arm on test), and calibrate the headline arm (``configured``) on ``calibrate_on`` patients.

    Args:
        data: a ``covtoken.data.catalog.LoadedDataset`` (items + sealed masks).
        splits: split name -> patient ids (``train``, ``calib``, ``test``).
        arms: arm name -> config; must include ``configured``.
        seed: seeds head initialisation, shuffling, augmentation and the "other" sample.
        weights, revisions: per-arm backbone overrides (local folder / Hub commit).
        calibrate_on: the split calibration is fitted on - ``"calib"``; anything else is a protocol violation that
            the leak test must catch (kept as a parameter so the test can attack it).
        on_backbone: called as ``on_backbone(arm, feature_backbone)`` right after each arm's backbone is built,
            before any training (the job refuses there weights a ``real`` entry cannot accept).
    """
    from ..eval.classification import open_class_labels

    if "configured" not in arms:
        raise ValueError(f"arms must include 'configured', got {sorted(arms)}")
    head_cfg = arms["configured"]
    labels = head_cfg.labels
    for name, c in arms.items():
        if c.labels != labels:
            raise ValueError(f"arm {name!r} has classes {c.labels}, the configured arm {labels}")
    by_patient: dict[str, list] = {}
    for it in data.items:
        by_patient.setdefault(it.patient_id, []).append(it)
    items = {s: [it for p in sorted(splits[s]) for it in by_patient.get(p, [])] for s in ("train", "calib", "test")}
    ids = {s: [it.image_id for it in v] for s, v in items.items()}
    patients = {s: [it.patient_id for it in v] for s, v in items.items()}
    cls = head_cfg.doc["classes"]

    def labels_of(split: str) -> np.ndarray:
        return open_class_labels(data.masks, ids[split], key=cls["label_key"], classes=labels, other=labels[-1])

    y_train = labels_of("train")
    keep = sample_other(y_train, len(labels) - 1, float(cls["other"]["train_fraction"]), seed)
    models = {}
    for name, cfg in arms.items():  # every backbone is built (and checked) before any arm trains
        models[name] = build_arm_model(cfg, weights=(weights or {}).get(name), revision=(revisions or {}).get(name),
                                       seed=seed)
        if on_backbone is not None:
            on_backbone(name, models[name].backbone)
    out = {}
    for name, cfg in arms.items():
        model = models.pop(name)
        dc = model.backbone.data_config
        px = {s: preprocess_images([it.image for it in v], dc) for s, v in items.items()}
        meta = {s: _meta(cfg, v) for s, v in items.items()}
        log.info("arm %s: training on %d images (%s)", name, len(keep), cfg.backbone["name"])
        tr = train_classifier(model, pixels=px["train"][keep], meta=None if meta["train"] is None else
                              meta["train"][keep], y=torch.from_numpy(y_train[keep]), recipe=cfg.recipe, seed=seed,
                              device=device)
        arm = Arm(name, cfg, tr)
        for s in ("calib", "test"):
            arm.logits[s] = predict_logits(tr.model, px[s], meta[s], batch_size=batch_size, device=device).numpy()
        if name == "configured":
            for view, x in zip(cfg.doc["tta"], tta_views(px["test"], cfg.doc["tta"])):
                arm.logits[f"test/{view}"] = predict_logits(tr.model, x, meta["test"], batch_size=batch_size,
                                                            device=device).numpy()
        out[name] = arm
    y_cal = labels_of(calibrate_on)
    cal_logits = out["configured"].logits[calibrate_on]
    ab = head_cfg.doc["abstain"]
    calibration = fit_calibration(cal_logits, y_cal, alpha=float(ab["conformal_alpha"]),
                                  target_risk=float(ab["target_risk"]))
    return FitStage(out, ids, patients, [ids["train"][i] for i in keep], calibration)
