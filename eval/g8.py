"""G8: do LeJEPA-pretrained features beat the same architecture at random init? (pure functions, no I/O)

Inputs are frozen image embeddings and final-block patch tokens of every arm (pretraining checkpoints, the
random initialisation, a pixel baseline), computed before any label was opened. Here the labels are opened:

1. *select* (validation patients): the checkpoint whose linear probe (trained on training patients' labels, ``C``
   chosen on validation) has the best validation AUROC - never the SSL loss;
2. *judge* (test patients): the linear-probe AUROC gain of that checkpoint over random init (patient-clustered
   paired bootstrap), the balanced-accuracy gain of 5-shot kNN episodes (same supports for both arms,
   patient-clustered paired bootstrap), with 1/10-shot, the data-efficiency curve, the segmentation probe and
   the pixel baseline reported beside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from ..data.layout import EvalMasks
from .bootstrap import clustered_bootstrap_auroc
from .labels import token_lesion_fraction
from .ssl import (balanced_accuracy_ci, data_efficiency, dice_per_patient, image_labels, knn_episodes,
                  linear_probe, mean_ci, pixel_masks, segmentation_probe)

__all__ = ["G8Inputs", "G8Result", "evaluate_g8"]


@dataclass(frozen=True)
class G8Inputs:
    """Label-free inputs of the evaluation.

    Attributes:
        image_ids, patient_ids: ``(n,)`` in feature-row order.
        rows: split name -> row indices (``train``, ``val``, ``test``).
        features: arm -> ``(n, d)`` image embeddings; arms ``random_init``, ``pixels`` and one per checkpoint.
        tokens: arm -> ``(n, N, d)`` final-block patch tokens (``random_init`` and the checkpoints).
        checkpoints: checkpoint arm names in step order.
        grid: token grid.
    """

    image_ids: list[str]
    patient_ids: list[str]
    rows: Mapping[str, np.ndarray]
    features: Mapping[str, np.ndarray]
    tokens: Mapping[str, np.ndarray]
    checkpoints: list[str]
    grid: tuple[int, int]


@dataclass(frozen=True)
class G8Result:
    metrics: dict[str, dict]
    selection: dict[str, Any]
    tables: dict[str, Any]
    test_pred_masks: dict[str, list[np.ndarray]]


def _metric(value: float | None, ci: Sequence[float] | None, method: str | None, n: Mapping[str, int], unit: str,
            description: str, ci_level: float) -> dict:
    return {"value": None if value is None else float(value), "ci": None if ci is None else [float(ci[0]), float(ci[1])],
            "ci_level": ci_level, "ci_method": method, "n": dict(n), "unit": unit, "description": description}


def evaluate_g8(inp: G8Inputs, masks: EvalMasks, P: Mapping[str, Any], *, seed: int) -> G8Result:
    """Select on validation, judge on test; returns metrics in the record's format, tables and selection."""
    n_boot, level = int(P["n_boot"]), float(P["ci_level"])
    y = image_labels(masks, inp.image_ids)
    pats = np.asarray(inp.patient_ids)
    tr, va, te = (np.asarray(inp.rows[k]) for k in ("train", "val", "test"))
    cs = [float(c) for c in P["probe_cs"]]

    def probe(arm: str):
        x = inp.features[arm]
        return linear_probe(x[tr], y[tr], x[va], y[va], x[te], cs=cs, seed=seed)

    # 1. select the checkpoint on validation patients (linear-probe AUROC), never on the SSL loss
    val_table = {arm: probe(arm) for arm in inp.checkpoints}
    chosen = max(inp.checkpoints, key=lambda a: (max(val_table[a].val_auroc.values()), -inp.checkpoints.index(a)))
    arms = {"trained": chosen, "random_init": "random_init", "pixels": "pixels"}
    probes = {name: (val_table[arm] if arm in val_table else probe(arm)) for name, arm in arms.items()}

    # 2. judge on test patients
    n_test = {"patients": int(len(np.unique(pats[te]))), "images": int(te.size)}
    boot = clustered_bootstrap_auroc(y[te], [probes["trained"].test_scores, probes["random_init"].test_scores],
                                     pats[te], n_boot=n_boot, ci_level=level, seed=seed)
    pix = clustered_bootstrap_auroc(y[te], probes["pixels"].test_scores, pats[te], n_boot=n_boot, ci_level=level,
                                    seed=seed)
    m: dict[str, dict] = {}
    desc = "test image-level lesion AUROC of the validation-tuned linear probe (sklearn LogisticRegression)"
    m["linear_probe_auroc_gain"] = _metric(boot.diff, boot.diff_ci, boot.method + " (paired difference)", n_test,
                                           "AUROC difference", f"{desc}: pretrained ({chosen}) minus random init",
                                           level)
    for i, name in enumerate(("trained", "random_init")):
        m[f"linear_probe_auroc_{name}"] = _metric(boot.auroc[i], boot.ci[i], boot.method, n_test, "AUROC",
                                                  f"{desc}, {name} features", level)
    m["linear_probe_auroc_pixels"] = _metric(pix.auroc[0], pix.ci[0], pix.method, n_test, "AUROC",
                                             f"{desc}, pixel baseline (downsampled pixels)", level)

    knn: dict[str, Any] = {}
    primary = int(P["primary_shots"])
    for shots in [int(s) for s in P["shots"]]:
        preds = [knn_episodes(inp.features[arms[a]][tr], y[tr], pats[tr], inp.features[arms[a]][te], shots=shots,
                              n_episodes=int(P["n_episodes"]), seed=seed + shots)
                 for a in ("trained", "random_init", "pixels")]
        res = balanced_accuracy_ci(preds, y[te], pats[te], n_boot=n_boot, ci_level=level, seed=seed)
        knn[shots] = res
        method = f"{res['method']}; {P['n_episodes']} episodes, supports from distinct training patients"
        for i, name in enumerate(("trained", "random_init", "pixels")):
            m[f"knn{shots}_balanced_accuracy_{name}"] = _metric(
                res["value"][i], res["ci"][i], method, n_test, "balanced accuracy",
                f"{shots}-shot cosine kNN on test images, {name} features", level)
        if shots == primary:
            m[f"knn{shots}_balanced_accuracy_gain"] = _metric(
                res["diff"], res["diff_ci"], method + " (paired difference)", n_test, "balanced accuracy difference",
                f"{shots}-shot kNN balanced accuracy: pretrained ({chosen}) minus random init", level)

    eff = {name: data_efficiency(inp.features[arm][tr], y[tr], inp.features[arm][va], y[va], inp.features[arm][te],
                                 y[te], fractions=[float(f) for f in P["data_fractions"]], seed=seed, cs=cs)
           for name, arm in arms.items()}

    # segmentation probe on final-block patch tokens (foreground Dice per patient; background never averaged in)
    ids = inp.image_ids
    frac_tr = token_lesion_fraction(masks, [ids[i] for i in tr], inp.grid)
    va_m, te_m = pixel_masks(masks, [ids[i] for i in va]), pixel_masks(masks, [ids[i] for i in te])
    seg: dict[str, Any] = {}
    pred_masks = {}
    for name in ("trained", "random_init"):
        t = inp.tokens[arms[name]]
        c, pred = segmentation_probe(t[tr], frac_tr, t[va], va_m, list(pats[va]), t[te], te_m, grid=inp.grid,
                                     positive_min=float(P["seg_positive_min"]), cs=cs, seed=seed)
        d = dice_per_patient(pred, te_m, list(pats[te]))
        value, ci = mean_ci(list(d["per_patient"].values()), n_boot=n_boot, ci_level=level, seed=seed)
        seg[name] = {"chosen_c": c, **d, "mean": value, "ci": ci}
        pred_masks[name] = pred
        m[f"seg_dice_{name}"] = _metric(value, ci, "percentile bootstrap over test patients of per-patient mean "
                                        "foreground Dice", {"patients": len(d["per_patient"]), "images": d["n_images"]},
                                        "Dice", f"linear probe on final-block patch tokens, {name} features; images "
                                        "without a lesion excluded (their false-positive pixels are in the table)",
                                        level)

    selection = {"checkpoint": {"chosen": chosen, "rule": "max validation linear-probe AUROC over checkpoints "
                                "(ties: earliest); the SSL loss is never used",
                                "val_auroc": {a: max(p.val_auroc.values()) for a, p in val_table.items()},
                                "chosen_c": {a: p.chosen_c for a, p in val_table.items()}},
                 "probe_c": {name: p.chosen_c for name, p in probes.items()}}
    tables = {"val_probe": {a: {str(c): v for c, v in p.val_auroc.items()} for a, p in val_table.items()},
              "knn": {str(k): v for k, v in knn.items()},
              "data_efficiency": {name: {str(f): v for f, v in e.items()} for name, e in eff.items()},
              "segmentation": seg,
              "test_auroc_check": {name: float(roc_auc_score(y[te], p.test_scores)) for name, p in probes.items()},
              "label_counts": {k: {"positive": int(y[r].sum()), "negative": int((1 - y[r]).sum())}
                               for k, r in (("train", tr), ("val", va), ("test", te))}}
    return G8Result(m, selection, tables, pred_masks)
