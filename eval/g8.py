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
from .recompute import Evaluation, recipe
from .labels import token_lesion_fraction
from .ssl import (balanced_accuracy_ci, dice_per_patient, fraction_rows, image_labels, knn_episodes, mean_ci,
                  pixel_masks, probe_decisions, segmentation_decisions, select_probe, select_segmentation,
                  volume_labels)

__all__ = ["G8Inputs", "g8_inputs", "g8_volume_inputs", "probe_arrays", "segmentation_arrays"]


@dataclass(frozen=True)
class G8Inputs:
    """Label-free inputs of the evaluation.

    Attributes:
        image_ids, patient_ids: ``(n,)`` in feature-row order (volume ids in the 3-D mode, one per patient).
        rows: split name -> row indices (``train``, ``val``, ``test``).
        features: arm -> ``(n, d)`` image embeddings; arms ``random_init``, ``pixels`` and one per checkpoint.
        tokens: arm -> ``(n, N, d)`` final-block patch tokens (``random_init`` and the checkpoints); empty in the
            3-D mode, which has no segmentation probe.
        checkpoints: checkpoint arm names in step order.
        grid: token grid (``()`` in the 3-D mode).
        slices_of: 3-D mode: volume id -> its slices' image ids (label-free; the evaluation reads labels by them).
    """

    image_ids: list[str]
    patient_ids: list[str]
    rows: Mapping[str, np.ndarray]
    features: Mapping[str, np.ndarray]
    tokens: Mapping[str, np.ndarray]
    checkpoints: list[str]
    grid: tuple[int, ...]
    slices_of: Mapping[str, Sequence[str]] | None = None


def _metric(value: float | None, ci: Sequence[float] | None, method: str | None, n: Mapping[str, int], unit: str,
            description: str, ci_level: float) -> dict:
    return {"value": None if value is None else float(value), "ci": None if ci is None else [float(ci[0]), float(ci[1])],
            "ci_level": ci_level, "ci_method": method, "n": dict(n), "unit": unit, "description": description}


def g8_inputs(inp: G8Inputs, masks: EvalMasks, P: Mapping[str, Any], *, seed: int) -> tuple[dict, dict, dict, dict]:
    """Arrays and arguments of recipes ``g8.probes`` and ``g8.segmentation`` (labels opened here, in eval).

    Returns:
        ``(probe_arrays, probe_args, seg_arrays, seg_args)``; the segmentation arrays hold the masks and the
        training lesion fractions; the caller adds the token classifiers' decisions once the checkpoint is chosen
        (see :func:`segmentation_arrays`).
    """
    y = image_labels(masks, inp.image_ids)
    arrays, args = _probe_inputs(inp, y, P, seed=seed)
    common = {k: args[k] for k in ("probe_cs", "n_boot", "ci_level", "seed")}
    ids = inp.image_ids
    tr, va, te = (np.asarray(inp.rows[k]) for k in ("train", "val", "test"))
    seg = {"frac.train": token_lesion_fraction(masks, [ids[i] for i in tr], inp.grid),
           "mask.val": np.stack(pixel_masks(masks, [ids[i] for i in va])),
           "mask.test": np.stack(pixel_masks(masks, [ids[i] for i in te])),
           "patients.val": np.asarray(inp.patient_ids)[va].astype(str),
           "patients.test": np.asarray(inp.patient_ids)[te].astype(str),
           **{f"rows.{k}": np.asarray(v, dtype=np.int64) for k, v in inp.rows.items()}}
    seg_args = {**common, "grid": list(inp.grid), "positive_min": float(P["seg_positive_min"]), "figure_images": 4}
    return arrays, args, seg, seg_args


def g8_volume_inputs(inp: G8Inputs, masks: EvalMasks, slices_of: Mapping[str, Sequence[str]], P: Mapping[str, Any], *,
                     seed: int) -> tuple[dict, dict]:
    """Arrays and arguments of recipe ``g8.probes`` for the 3-D mode: one row per volume, labelled 1 when any of its
    slices (``slices_of[volume_id]``) holds a lesion pixel (labels opened here, in eval)."""
    return _probe_inputs(inp, volume_labels(masks, slices_of, inp.image_ids), P, seed=seed)


def _probe_inputs(inp: G8Inputs, y: np.ndarray, P: Mapping[str, Any], *, seed: int) -> tuple[dict, dict]:
    """``g8.probes``'s stored arrays (labels, patients, rows, features, the fitted probes' decisions) and args."""
    arrays = {"labels": y, "patients": np.asarray(inp.patient_ids).astype(str),
              **{f"rows.{k}": np.asarray(v, dtype=np.int64) for k, v in inp.rows.items()},
              **{f"feat.{arm}": np.asarray(v, dtype=np.float32) for arm, v in inp.features.items()}}
    common = {"probe_cs": [float(c) for c in P["probe_cs"]], "n_boot": int(P["n_boot"]),
              "ci_level": float(P["ci_level"]), "seed": int(seed)}
    args = {**common, "checkpoints": list(inp.checkpoints), "shots": [int(s) for s in P["shots"]],
            "primary_shots": int(P["primary_shots"]), "n_episodes": int(P["n_episodes"]),
            "data_fractions": [float(f) for f in P["data_fractions"]]}
    tr, va, te = (np.asarray(inp.rows[k]) for k in ("train", "val", "test"))
    arrays.update(probe_arrays(inp.features, y, tr, va, te, cs=common["probe_cs"], fractions=args["data_fractions"],
                               seed=int(seed)))
    return arrays, args


def probe_arrays(features: Mapping[str, np.ndarray], y: np.ndarray, tr: np.ndarray, va: np.ndarray, te: np.ndarray,
                 *, cs: Sequence[float], fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """The fit role of the image-level probes, for every arm: decisions per ``C`` on validation and test images.

    ``lp.<arm>.val|test`` from the probe on all training labels, ``de.<arm>.<j>.val|test`` from the probe on the
    ``j``-th data fraction (:func:`~covtoken.eval.ssl.fraction_rows`). Only training labels are read; the recipe
    selects ``C`` (and the checkpoint) on validation and judges on test from these decisions alone.
    """
    out: dict[str, np.ndarray] = {}
    subsets = list(fraction_rows(y[tr], fractions, seed=seed).values())
    for arm, x in features.items():
        x = np.asarray(x, dtype=np.float32)
        _, (out[f"lp.{arm}.val"], out[f"lp.{arm}.test"]) = probe_decisions(x[tr], y[tr], [x[va], x[te]], cs=cs,
                                                                          seed=seed)
        for j, keep in enumerate(subsets):
            _, (out[f"de.{arm}.{j}.val"], out[f"de.{arm}.{j}.test"]) = probe_decisions(
                x[tr][keep], y[tr][keep], [x[va], x[te]], cs=cs, seed=seed)
    return out


def segmentation_arrays(seg: Mapping[str, np.ndarray], seg_args: Mapping[str, Any], inp: G8Inputs, chosen: str) -> dict:
    """The stored inputs of ``g8.segmentation``: the fitted token classifiers' decisions on val and test.

    The fit role runs here, on training patients' final-block tokens of the chosen checkpoint and of the random
    init (one linear classifier per ``C``, :func:`~covtoken.eval.ssl.segmentation_decisions`); the recipe selects
    ``C`` on validation and judges on test from the decisions alone, so the tokens themselves are not stored.
    """
    out = {k: v for k, v in seg.items() if k != "frac.train"}
    tr, va, te = (np.asarray(inp.rows[k]) for k in ("train", "val", "test"))
    for name, key in (("trained", chosen), ("random_init", "random_init")):
        t = inp.tokens[key].astype(np.float32)
        _, out[f"dec.{name}.val"], out[f"dec.{name}.test"] = segmentation_decisions(
            t[tr], seg["frac.train"], t[va], t[te], grid=tuple(int(g) for g in seg_args["grid"]),
            positive_min=float(seg_args["positive_min"]), cs=list(seg_args["probe_cs"]), seed=int(seg_args["seed"]))
    return out


@recipe("g8.probes")
def g8_probes(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G8 selection (checkpoint by validation linear-probe AUROC) and test metrics of the image-level probes."""
    n_boot, level, seed = int(args["n_boot"]), float(args["ci_level"]), int(args["seed"])
    y, pats = a["labels"], a["patients"]
    tr, va, te = a["rows.train"], a["rows.val"], a["rows.test"]
    cs = sorted(float(c) for c in args["probe_cs"])
    ckpts = list(args["checkpoints"])

    def probe(arm: str, key: str = "lp.{arm}"):
        stem = key.format(arm=arm)
        return select_probe(cs, a[f"{stem}.val"], y[va], a[f"{stem}.test"])

    # 1. select the checkpoint on validation patients (linear-probe AUROC), never on the SSL loss
    val_table = {arm: probe(arm) for arm in ckpts}
    chosen = max(ckpts, key=lambda c: (max(val_table[c].val_auroc.values()), -ckpts.index(c)))
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
    primary = int(args["primary_shots"])
    for shots in [int(s) for s in args["shots"]]:
        preds = [knn_episodes(a[f"feat.{arms[n]}"][tr], y[tr], pats[tr], a[f"feat.{arms[n]}"][te], shots=shots,
                              n_episodes=int(args["n_episodes"]), seed=seed + shots)
                 for n in ("trained", "random_init", "pixels")]
        res = balanced_accuracy_ci(preds, y[te], pats[te], n_boot=n_boot, ci_level=level, seed=seed)
        knn[str(shots)] = res
        method = f"{res['method']}; {args['n_episodes']} episodes, supports from distinct training patients"
        for i, name in enumerate(("trained", "random_init", "pixels")):
            m[f"knn{shots}_balanced_accuracy_{name}"] = _metric(
                res["value"][i], res["ci"][i], method, n_test, "balanced accuracy",
                f"{shots}-shot cosine kNN on test images, {name} features", level)
        if shots == primary:
            m[f"knn{shots}_balanced_accuracy_gain"] = _metric(
                res["diff"], res["diff_ci"], method + " (paired difference)", n_test, "balanced accuracy difference",
                f"{shots}-shot kNN balanced accuracy: pretrained ({chosen}) minus random init", level)
    fractions = [float(f) for f in args["data_fractions"]]
    eff = {name: {f: float(roc_auc_score(y[te], probe(arm, f"de.{{arm}}.{j}").test_scores))
                  for j, f in enumerate(fractions)}
           for name, arm in arms.items()}
    selection = {"checkpoint": {"chosen": chosen, "rule": "max validation linear-probe AUROC over checkpoints "
                                "(ties: earliest); the SSL loss is never used",
                                "val_auroc": {c: max(p.val_auroc.values()) for c, p in val_table.items()},
                                "chosen_c": {c: p.chosen_c for c, p in val_table.items()}},
                 "probe_c": {name: p.chosen_c for name, p in probes.items()}}
    tables = {"val_probe": {c: {str(k): v for k, v in p.val_auroc.items()} for c, p in val_table.items()},
              "knn": knn, "data_efficiency": {n: {str(f): v for f, v in e.items()} for n, e in eff.items()},
              "test_auroc_check": {n: float(roc_auc_score(y[te], p.test_scores)) for n, p in probes.items()},
              "label_counts": {k: {"positive": int(y[r].sum()), "negative": int((1 - y[r]).sum())}
                               for k, r in (("train", tr), ("val", va), ("test", te))}}
    return Evaluation(metrics=m, extras={"selection": selection, "tables": tables})


@recipe("g8.segmentation")
def g8_segmentation(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """Segmentation probe on final-block patch tokens: ``C`` chosen on validation from the stored token decisions,
    foreground Dice per test patient (background never in)."""
    n_boot, level, seed = int(args["n_boot"]), float(args["ci_level"]), int(args["seed"])
    grid = tuple(int(g) for g in args["grid"])
    va_m, te_m = list(a["mask.val"]), list(a["mask.test"])
    cs = sorted(float(c) for c in args["probe_cs"])
    m, table, preview = {}, {}, {}
    for name in ("trained", "random_init"):
        c, pred = select_segmentation(cs, a[f"dec.{name}.val"], va_m, list(a["patients.val"]), a[f"dec.{name}.test"],
                                      te_m)
        d = dice_per_patient(pred, te_m, list(a["patients.test"]))
        value, ci = mean_ci(list(d["per_patient"].values()), n_boot=n_boot, ci_level=level, seed=seed)
        table[name] = {"chosen_c": c, **d, "mean": value, "ci": list(ci)}
        step = (te_m[0].shape[0] // grid[0], te_m[0].shape[1] // grid[1])
        preview[name] = [p[::step[0], ::step[1]].astype(int).tolist() for p in pred[:int(args["figure_images"])]]
        m[f"seg_dice_{name}"] = _metric(value, ci, "percentile bootstrap over test patients of per-patient mean "
                                        "foreground Dice", {"patients": len(d["per_patient"]), "images": d["n_images"]},
                                        "Dice", f"linear probe on final-block patch tokens, {name} features; images "
                                        "without a lesion excluded (their false-positive pixels are in the table)",
                                        level)
    return Evaluation(metrics=m, extras={"segmentation": table, "preview_token_masks": preview})
