"""G6 evaluation (coverage-constrained pruner vs membership pruning; the coverage mechanism) and recipe ``g6.pruner``.

Moved from the job script so that the audit recomputes the record's metrics through the same functions
(:mod:`covtoken.eval.recompute`). The pruner's keep sets are label-free outputs and are stored as inputs.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from .gate_g3 import pack_lesions, unpack_lesions
from .lesion_miss import (LesionSet, best_rank, clustered_median_bootstrap, clustered_rate_bootstrap, diff_metric,
                          random_miss_probability, rate_metric, retained_by, select_lowest_miss)
from .recompute import Evaluation, RecipeError, recipe

__all__ = ["FUNCTIONAL_PARAMS", "evaluate_g6", "g6_inputs"]

FUNCTIONAL_PARAMS = {"rankme": {}, "coding_rate": {"eps": 0.5}, "energy": {}}
_PRUNED = ("kept", "keep_fraction", "ratio", "repaired")
_PARAMS = ("n_boot", "ci_level", "pruner", "small_max_area_tokens", "reference_keep_rate")


def _median_metric(values: np.ndarray, patients: np.ndarray, P: Mapping[str, Any], seed: int, *, unit: str,
                   description: str) -> dict:
    med, ci, n = clustered_median_bootstrap(values, patients, n_boot=int(P["n_boot"]), ci_level=float(P["ci_level"]),
                                            seed=seed)
    return {"value": med, "ci": list(ci), "ci_level": float(P["ci_level"]),
            "ci_method": "patient-clustered percentile bootstrap of the median over images", "n": n, "unit": unit,
            "description": description}


def evaluate_g6(*, tokens: np.ndarray, membership: np.ndarray, pruned: Any, lesions: LesionSet, small_max: float,
                P: Mapping[str, Any], seed: int) -> tuple[dict, list[dict]]:
    """Recall at equal keep counts (C1) and the mechanism (C2) on test images.

    Args:
        tokens: ``(B, N, d)`` test tokens of the pruner's block.
        membership: ``(B, N)`` membership scores of the selected arm on the same images.
        pruned: the pruner's result on ``tokens``.
        lesions: LesionSet of the test images (rows index ``tokens``).
        small_max: small-lesion area cut-off in tokens.
        P: locked parameters.
        seed: bootstrap / random-removal seed.

    Returns:
        ``(metrics, per_image)``.
    """
    from ..coverage import evaluate, relative_change
    from ..gate.keep import token_ranks

    n_img, n_tok = membership.shape
    k = pruned.kept.sum(axis=1)
    small = lesions.select(lesions.area <= small_max)
    if len(small) == 0:
        raise ValueError(f"no small lesion (area <= {small_max} tokens) among the test patients")
    kk = k[small.image]
    events = [retained_by(pruned.kept, small), best_rank(token_ranks(membership), small) < kk,
              1.0 - random_miss_probability(n_tok, small.n_touched, kk)]
    rb = clustered_rate_bootstrap(np.array(events, dtype=np.float64), small, n_boot=int(P["n_boot"]),
                                  ci_level=float(P["ci_level"]), seed=seed)
    unit = "small-lesion recall"
    metrics = {
        "small_recall_pruner": rate_metric(rb, 0, unit=unit, description="coverage-constrained pruner, deterministic gates"),
        "small_recall_membership": rate_metric(rb, 1, unit=unit, description=(
            "membership pruning keeping as many tokens as the pruner in each image")),
        "small_recall_random": rate_metric(rb, 2, unit=unit, description=(
            "expected recall of as many tokens kept uniformly at random, 1 - C(N-t,k)/C(N,k)")),
        "delta_small_recall": diff_metric(rb, 0, 1, unit="small-lesion recall difference", description=(
            "pruner minus membership at equal per-image keep counts, paired over patients")),
        "delta_small_recall_vs_random": diff_metric(rb, 0, 2, unit="small-lesion recall difference",
                                                    description="pruner minus random keep at equal keep counts"),
    }

    les_img = np.unique(lesions.image)
    mask = np.zeros((n_img, n_tok), dtype=bool)
    for img, toks in zip(lesions.image, lesions.tokens):
        mask[img, toks] = True
    mask = mask[les_img]
    x = tokens[les_img]
    rng = np.random.default_rng(seed)
    rand = np.zeros_like(mask)
    for i in range(len(les_img)):
        free = np.flatnonzero(~mask[i])
        rand[i, rng.choice(free, size=min(int(mask[i].sum()), free.size), replace=False)] = True
    patient_of = dict(zip(lesions.image.tolist(), lesions.patient.tolist()))
    patients = np.array([patient_of[int(img)] for img in les_img], dtype=object)
    per_image = [{"test_row": int(r), "lesion_tokens": int(m.sum()), "kept": int(k[r])} for r, m in zip(les_img, mask)]
    pc = dict(P["pruner"])
    slack = 1.0 - float(pc["target"])
    for name, params in FUNCTIONAL_PARAMS.items():
        drop = -relative_change(name, x, mask, **params)
        drop_random = -relative_change(name, x, rand, **params)
        for rec, a, b in zip(per_image, drop, drop_random):
            rec[f"drop_{name}"], rec[f"random_drop_{name}"] = float(a), float(b)
        metrics[f"lesion_drop_{name}"] = _median_metric(drop, patients, P, seed, unit="relative drop", description=(
            f"(F(all) - F(all minus every lesion token)) / F(all) for {name}, median over lesion images"))
        metrics[f"random_drop_{name}"] = _median_metric(drop_random, patients, P, seed, unit="relative drop",
                                                        description=f"the same for as many random non-lesion tokens ({name})")
    cf, cp = pc["functional"], ({} if pc.get("eps") is None else {"eps": float(pc["eps"])})
    drop_cf = -relative_change(cf, x, mask, **cp)
    metrics["lesion_drop_over_slack"] = _median_metric(drop_cf / slack, patients, P, seed, unit="ratio", description=(
        f"relative drop of the constraint functional ({cf}) when every lesion token is removed, over the slack "
        f"1 - c = {slack:.3g}; below 1 the constraint holds with every lesion token dropped"))
    full = evaluate(cf, x, None, **cp)
    kept = pruned.kept[les_img]
    gain = (evaluate(cf, x, kept | mask, **cp) - evaluate(cf, x, kept, **cp)) / full
    for rec, g in zip(per_image, gain):
        rec["restore_gain"] = float(g)
    metrics["restore_gain_over_slack"] = _median_metric(gain / slack, patients, P, seed, unit="ratio", description=(
        "(F(pruner keep set + lesion tokens) - F(pruner keep set)) / F(all), over the slack: what restoring the "
        "lesion tokens would buy the optimiser"))
    metrics["pruner_keep_fraction"] = {
        "value": float(pruned.keep_fraction.mean()), "ci": None, "ci_method": None,
        "n": {"images": int(n_img), "tokens": int(n_img * n_tok)}, "unit": "fraction of tokens",
        "description": "mean fraction of tokens the pruner keeps per test image (membership keeps the same counts)"}
    metrics["constraint_met_fraction"] = {
        "value": float(np.mean(pruned.ratio >= float(pc["target"]) - 1e-9)), "ci": None, "ci_method": None,
        "n": {"images": int(n_img)}, "unit": "fraction of images",
        "description": f"test images whose returned keep set satisfies F(kept) >= {pc['target']} F(all) "
                       f"({int((pruned.repaired > 0).sum())} of {n_img} images needed dropped tokens added back)"}
    return metrics, per_image


def g6_inputs(*, tokens: np.ndarray, membership: Mapping[str, np.ndarray], n_val: int, pruned: Any,
              lesions: Mapping[str, LesionSet], arm: str, P: Mapping[str, Any], seed: int) -> tuple[dict, dict]:
    """Arrays and arguments of recipe ``g6.pruner`` (``membership``: arm -> (val + test images, N) scores)."""
    arrays = {"tokens": np.asarray(tokens), **{f"membership.{a}": np.asarray(v) for a, v in membership.items()},
              **{f"pruned.{k}": np.asarray(getattr(pruned, k)) for k in _PRUNED}}
    for sp, les in lesions.items():
        arrays.update(pack_lesions(f"lesions.{sp}", les))
    return arrays, {"n_val": int(n_val), "arm": arm, "seed": int(seed), "P": {k: P[k] for k in _PARAMS}}


@recipe("g6.pruner")
def g6_pruner(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G6: membership arm selected on validation; pruner vs membership recall and the mechanism on test."""
    from ..gate.keep import keep_count, token_ranks

    P, n_val = args["P"], int(args["n_val"])
    membership = {k.partition(".")[2]: v for k, v in a.items() if k.startswith("membership.")}
    val, test = unpack_lesions(a, "lesions.val"), unpack_lesions(a, "lesions.test")
    n_tok = next(iter(membership.values())).shape[1]
    val_small = val.select(val.area <= float(P["small_max_area_tokens"]))
    arm, val_miss = select_lowest_miss({k: best_rank(token_ranks(s[:n_val]), val_small) for k, s in membership.items()},
                                       keep_count(n_tok, float(P["reference_keep_rate"])))
    if arm != args["arm"]:
        raise RecipeError(f"validation selects {arm}, but the stored test tokens are those of {args['arm']}")
    pruned = SimpleNamespace(**{k: a[f"pruned.{k}"] for k in _PRUNED})
    metrics, per_image = evaluate_g6(tokens=a["tokens"], membership=membership[arm][n_val:], pruned=pruned,
                                     lesions=test, small_max=float(P["small_max_area_tokens"]), P=P,
                                     seed=int(args["seed"]))
    metrics["membership_block"] = {"value": float(arm.rpartition("@")[2]), "ci": None, "ci_method": None,
                                   "n": {"patients": int(len(np.unique(val_small.patient)))},
                                   "unit": "0-based block index", "description": f"{arm} chosen on validation"}
    return Evaluation(metrics=metrics, extras={"per_image": per_image, "val_miss": val_miss})
