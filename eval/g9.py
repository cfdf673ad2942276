"""G9's judged metrics from test logits and test labels (pure; the job passes arrays, nothing is read here).

Headline: the configured arm (reduced questionnaire) on one view. TTA is a separate, paired difference and never
replaces the headline. C1: paired top-1 gain over the baseline arm; C2: paired top-1 difference reduced - full
(non-inferiority: CI low above minus the locked margin); C3: empirical coverage of the conformal sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .recompute import Evaluation, recipe
from .classification import (aurc_with_ci, clustered_mean, clustered_paired_difference, confusion,
                             conformal_coverage_band, ece_with_ci, per_class_recall, risk_coverage, softmax, topk_hits)

__all__ = ["G9Result", "evaluate_g9", "g9_arrays", "g9_classifier_recipe"]


@dataclass
class G9Result:
    metrics: dict
    tables: dict          # per-class recall, confusion matrix, risk-coverage curve (artefacts / figures)


def _value(v: float, n: int, patients: int, description: str, unit: str = "fraction") -> dict:
    return {"value": float(v), "ci": None, "ci_method": None, "n": {"images": n, "patients": patients},
            "unit": unit, "description": description}


def evaluate_g9(*, logits: Mapping[str, np.ndarray], tta_logits: Sequence[np.ndarray], y: np.ndarray,
                patients: Sequence[str], labels: Sequence[str], temperature: float, abstain_threshold: float,
                prediction_sets: np.ndarray, alpha: float, n_calibration: int, top_k: int, n_boot: int,
                ci_level: float, seed: int) -> G9Result:
    """Metrics of every criterion and the reported extras.

    Args:
        logits: arm -> ``(n, C)`` test logits (``configured``, ``full``, ``baseline``), one view (identity).
        tta_logits: the configured arm's test logits under each TTA view (averaged as probabilities).
        y: ``(n,)`` test labels; patients: ``(n,)`` test patient ids (the bootstrap clusters).
        temperature, abstain_threshold: fitted on calibration patients.
        prediction_sets: ``(n, C)`` 0/1 conformal sets of the test images (from crepes, fitted on calibration).
        alpha: conformal miscoverage; n_calibration: calibration images (for the finite-sample band).
    """
    y = np.asarray(y, dtype=np.int64)
    cl = np.asarray(patients)
    n, k_pat = len(y), len(set(patients))
    opts = {"n_boot": n_boot, "ci_level": ci_level, "seed": seed}
    p = {a: softmax(z) for a, z in logits.items()}
    hits = {a: topk_hits(q, y, 1) for a, q in p.items()}
    m: dict[str, dict] = {}
    m["top1"] = clustered_mean(hits["configured"], cl, **opts).metric(
        unit="fraction", description="top-1 accuracy of the configured model (reduced questionnaire), one view")
    m[f"top{top_k}"] = clustered_mean(topk_hits(p["configured"], y, top_k), cl, **opts).metric(
        unit="fraction", description=f"top-{top_k} accuracy of the configured model")
    m["baseline_top1"] = clustered_mean(hits["baseline"], cl, **opts).metric(
        unit="fraction", description="top-1 accuracy of the baseline (same questionnaire)")
    m["full_top1"] = clustered_mean(hits["full"], cl, **opts).metric(
        unit="fraction", description="top-1 accuracy of the configured backbone with the full questionnaire")
    m["delta_top1_configured_baseline"] = clustered_paired_difference(hits["configured"], hits["baseline"], cl,
                                                                      **opts).metric(
        unit="fraction", description="paired top-1 gain of the configured model over the baseline (C1)")
    m["delta_top1_reduced_full"] = clustered_paired_difference(hits["configured"], hits["full"], cl, **opts).metric(
        unit="fraction", description="paired top-1 difference reduced - full questionnaire (C2, non-inferiority)")
    p_tta = np.mean([softmax(z) for z in tta_logits], axis=0)
    tta_hits = topk_hits(p_tta, y, 1)
    m["tta_top1"] = clustered_mean(tta_hits, cl, **opts).metric(
        unit="fraction", description="top-1 with test-time augmentation (mean probability over views); not the headline")
    m["delta_top1_tta"] = clustered_paired_difference(tta_hits, hits["configured"], cl, **opts).metric(
        unit="fraction", description="paired top-1 difference TTA - single view")
    pc = softmax(logits["configured"], temperature)
    m["ece_before"] = ece_with_ci(p["configured"], y, cl, **opts).metric(
        unit="fraction", description="top-label ECE (15 bins) of the configured model before temperature scaling")
    m["ece_after"] = ece_with_ci(pc, y, cl, **opts).metric(
        unit="fraction", description="top-label ECE after temperature scaling fitted on calibration patients")
    conf, correct = pc.max(axis=1), (pc.argmax(axis=1) == y).astype(float)
    m["aurc"] = aurc_with_ci(conf, correct, cl, **opts).metric(
        unit="fraction", description="area under the risk-coverage curve (temperature-scaled confidence)")
    answered = conf >= abstain_threshold
    m["abstain_rate"] = clustered_mean(1.0 - answered, cl, **opts).metric(
        unit="fraction", description="test images abstained on at the calibrated threshold")
    if answered.any():
        sel = clustered_mean(correct[answered], cl[answered], **opts) if len(set(cl[answered])) >= 2 else None
        m["selective_top1"] = (sel.metric(unit="fraction", description="top-1 among answered test images")
                               if sel else _value(correct[answered].mean(), int(answered.sum()), 1,
                                                  "top-1 among answered test images"))
    sets = np.asarray(prediction_sets, dtype=np.int64)
    covered = sets[np.arange(n), y].astype(float)
    m["conformal_coverage"] = clustered_mean(covered, cl, **opts).metric(
        unit="fraction", description=f"test images whose conformal set (alpha={alpha}) contains the true class (C3)")
    m["conformal_mean_set_size"] = clustered_mean(sets.sum(axis=1).astype(float), cl, **opts).metric(
        unit="classes", description="mean conformal set size")
    lo, hi = conformal_coverage_band(n_calibration, n, alpha, level=0.99)
    m["conformal_band_low"] = _value(lo, n, k_pat, "0.5% quantile of test coverage for exchangeable data "
                                                   "(beta-binomial, split conformal)")
    m["conformal_band_high"] = _value(hi, n, k_pat, "99.5% quantile of test coverage for exchangeable data")
    pred = pc.argmax(axis=1)
    rc = risk_coverage(conf, correct)
    tables = {"labels": list(labels),
              "per_class_recall": dict(zip(labels, per_class_recall(y, pred, len(labels)))),
              "confusion": confusion(y, pred, len(labels)).tolist(),
              "risk_coverage": {"coverage": rc["coverage"].tolist(), "risk": rc["risk"].tolist(),
                                "threshold": rc["threshold"].tolist()},
              "abstain_threshold": abstain_threshold if np.isfinite(abstain_threshold) else None,
              "conformal_in_band": bool(lo <= covered.mean() <= hi)}
    return G9Result(m, tables)


def g9_arrays(*, logits: Mapping[str, np.ndarray], tta_logits: Sequence[np.ndarray], y: np.ndarray,
              patients: Sequence[str], prediction_sets: np.ndarray) -> dict[str, np.ndarray]:
    """The evaluation inputs of recipe ``g9.classifier`` (stored as ``eval_inputs-<k>.npz`` by the runner)."""
    return {**{f"logits_{a}": np.asarray(z, dtype=np.float32) for a, z in logits.items()},
            "tta_logits": np.stack([np.asarray(z, dtype=np.float32) for z in tta_logits]),
            "y": np.asarray(y, dtype=np.int64), "patients": np.asarray(list(patients)).astype(str),
            "prediction_sets": np.asarray(prediction_sets, dtype=np.int8)}


@recipe("g9.classifier")
def g9_classifier_recipe(a: Mapping[str, np.ndarray], args: Mapping[str, object]) -> Evaluation:
    """Recipe form of :func:`evaluate_g9` (the audit recomputes G9's metrics through it)."""
    logits = {k.removeprefix("logits_"): v.astype(np.float64) for k, v in a.items() if k.startswith("logits_")}
    res = evaluate_g9(logits=logits, tta_logits=list(a["tta_logits"].astype(np.float64)), y=a["y"],
                      patients=[str(p) for p in a["patients"]], labels=list(args["labels"]),
                      temperature=float(args["temperature"]),
                      abstain_threshold=float("inf") if args["abstain_threshold"] is None
                      else float(args["abstain_threshold"]),
                      prediction_sets=a["prediction_sets"], alpha=float(args["alpha"]),
                      n_calibration=int(args["n_calibration"]), top_k=int(args["top_k"]), n_boot=int(args["n_boot"]),
                      ci_level=float(args["ci_level"]), seed=int(args["seed"]))
    return Evaluation(metrics=res.metrics, extras=res.tables)
