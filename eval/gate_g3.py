"""G3 evaluation (lesion miss rates of membership vs CLS-saliency pruning) and its recipe ``g3.miss``.

Moved from the job script so that the audit recomputes the record's metrics through the same function
(see :mod:`covtoken.eval.recompute`).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from .lesion_miss import (LesionSet, best_rank, clustered_rate_bootstrap, diff_metric, random_miss_probability,
                          rate_metric, select_lowest_miss)
from .recompute import Evaluation, recipe

__all__ = ["evaluate_g3", "pack_lesions", "unpack_lesions", "g3_inputs"]

#: The locked parameters evaluate_g3 reads.
G3_PARAMS = ("small_max_area_tokens", "keep_rates", "primary_keep_rate", "n_boot", "ci_level")


def evaluate_g3(lf: Any, lesions: dict, P: Mapping[str, Any], n_tok: int, seed: int) -> tuple[dict, dict, list]:
    """Select each arm on validation, compare on test. ``lesions``: split -> LesionSet (rows index the split).

    Returns:
        ``(metrics, selection, curve)``: record metrics, what was selected and how, the per-keep-rate table.
    """
    from ..gate.keep import keep_count, token_ranks

    small_max = float(P["small_max_area_tokens"])
    n_val = len(lf.rows["val"])
    rates = [float(r) for r in P["keep_rates"]]
    primary = float(P["primary_keep_rate"])
    if primary not in rates:
        raise ValueError(f"primary keep rate {primary} is not on the keep-rate grid {rates}")
    ks = {r: keep_count(n_tok, r) for r in rates}
    arms = {**{a: s for a, s in lf.membership.items()}, **{f"cls@{b}": s for b, s in lf.saliency.items()}}
    split_rows = {"val": slice(0, n_val), "test": slice(n_val, None)}
    small = {sp: les.select(les.area <= small_max) for sp, les in lesions.items()}
    for sp, les in small.items():
        if len(les) == 0:
            raise ValueError(f"no small lesion (area <= {small_max} tokens) among the {sp} patients")
    best = {sp: {a: best_rank(token_ranks(s[split_rows[sp]]), small[sp]) for a, s in arms.items()} for sp in small}
    mem, val_miss = select_lowest_miss({a: r for a, r in best["val"].items() if not a.startswith("cls@")}, ks[primary])
    sal, val_sal = select_lowest_miss({a: r for a, r in best["val"].items() if a.startswith("cls@")}, ks[primary])
    val_miss.update(val_sal)

    test = small["test"]
    touched = test.n_touched
    events = []
    for r in rates:
        events += [best["test"][mem] >= ks[r], best["test"][sal] >= ks[r], random_miss_probability(n_tok, touched, ks[r])]
    rb = clustered_rate_bootstrap(np.array(events, dtype=np.float64), test, n_boot=int(P["n_boot"]),
                                  ci_level=float(P["ci_level"]), seed=seed)
    all_test = lesions["test"]
    all_best = [best_rank(token_ranks(arms[a][split_rows["test"]]), all_test) >= ks[primary] for a in (mem, sal)]
    rb_all = clustered_rate_bootstrap(np.array(all_best, dtype=np.float64), all_test, n_boot=int(P["n_boot"]),
                                      ci_level=float(P["ci_level"]), seed=seed)

    def tag(r: float) -> str:
        return f"keep{int(round(100 * r)):02d}"

    unit, dunit = "small-lesion miss rate", "small-lesion miss rate difference"
    metrics, curve = {}, []
    for i, r in enumerate(rates):
        m, s, z = 3 * i, 3 * i + 1, 3 * i + 2
        what = f"at keep rate {r} ({ks[r]} of {n_tok} tokens)"
        metrics[f"small_miss_membership_{tag(r)}"] = rate_metric(rb, m, unit=unit, description=f"membership ({mem}) {what}")
        metrics[f"small_miss_saliency_{tag(r)}"] = rate_metric(rb, s, unit=unit, description=f"CLS attention ({sal}) {what}")
        metrics[f"delta_small_miss_{tag(r)}"] = diff_metric(rb, s, m, unit=dunit,
                                                            description=f"saliency minus membership {what}")
        curve.append({"keep_rate": r, "keep_count": ks[r], "membership": rb.value[m], "membership_ci": rb.ci(m),
                      "saliency": rb.value[s], "saliency_ci": rb.ci(s), "random": rb.value[z], "random_ci": rb.ci(z),
                      "delta": rb.diff(s, m)[0], "delta_ci": rb.diff(s, m)[1]})
    i = rates.index(primary)
    metrics["delta_small_miss"] = {**metrics[f"delta_small_miss_{tag(primary)}"],
                                   "description": f"primary: saliency ({sal}) minus membership ({mem}) small-lesion "
                                                  f"miss rate at keep rate {primary}, paired over patients"}
    metrics["small_miss_membership"] = metrics[f"small_miss_membership_{tag(primary)}"]
    metrics["small_miss_saliency"] = metrics[f"small_miss_saliency_{tag(primary)}"]
    metrics["small_miss_random"] = rate_metric(rb, 3 * i + 2, unit=unit, description=(
        f"expected miss rate of keeping {ks[primary]} tokens uniformly at random (C(N-t,k)/C(N,k) per lesion)"))
    metrics["all_miss_membership"] = rate_metric(rb_all, 0, unit="lesion miss rate", description=(
        f"all lesions (any size), membership ({mem}) at keep rate {primary}"))
    metrics["delta_all_miss"] = diff_metric(rb_all, 1, 0, unit="lesion miss rate difference", description=(
        f"all lesions (any size): saliency minus membership at keep rate {primary}"))
    n_val_pat = {"patients": int(len(np.unique(small["val"].patient)))}
    for name, arm in (("membership_block", mem), ("saliency_block", sal)):
        metrics[name] = {"value": float(arm.rpartition("@")[2]), "ci": None, "ci_method": None, "n": n_val_pat,
                         "unit": "0-based block index", "description": f"{arm} chosen on validation"}
    selection = {"membership_arm": mem, "saliency_arm": sal, "val_small_miss_at_primary": val_miss,
                 "rule": "lowest validation small-lesion miss rate at the primary keep rate; ties -> lower block, then name",
                 "primary_keep_rate": primary, "small_max_area_tokens": small_max}
    return metrics, selection, curve


def pack_lesions(prefix: str, les: LesionSet) -> dict[str, np.ndarray]:
    """A :class:`LesionSet` as flat arrays (token lists concatenated, with their lengths)."""
    lens = np.array([t.size for t in les.tokens], dtype=np.int64)
    flat = np.concatenate(les.tokens) if les.tokens else np.zeros(0, dtype=np.int64)
    return {f"{prefix}.image": les.image, f"{prefix}.patient": np.asarray(les.patient).astype(str),
            f"{prefix}.area": les.area, f"{prefix}.tokens": flat.astype(np.int64), f"{prefix}.lengths": lens}


def unpack_lesions(a: Mapping[str, np.ndarray], prefix: str) -> LesionSet:
    """Inverse of :func:`pack_lesions`."""
    ends = np.cumsum(a[f"{prefix}.lengths"])
    tokens = tuple(np.split(a[f"{prefix}.tokens"], ends[:-1])) if ends.size else ()
    return LesionSet(a[f"{prefix}.image"], a[f"{prefix}.patient"].astype(object), a[f"{prefix}.area"], tokens)


def g3_inputs(lf: Any, lesions: Mapping[str, LesionSet], P: Mapping[str, Any], n_tok: int,
              seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and arguments of recipe ``g3.miss`` for one run."""
    arrays = {f"membership.{a}": np.asarray(s) for a, s in lf.membership.items()}
    arrays.update({f"saliency.{b}": np.asarray(s) for b, s in lf.saliency.items()})
    for sp, les in lesions.items():
        arrays.update(pack_lesions(f"lesions.{sp}", les))
    args = {"P": {k: P[k] for k in G3_PARAMS}, "n_tok": int(n_tok), "seed": int(seed), "n_val": len(lf.rows["val"])}
    return arrays, args


@recipe("g3.miss")
def g3_miss(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G3: arms selected on validation, small-lesion miss rates compared on test (paired clustered bootstrap)."""
    lf = SimpleNamespace(
        rows={"val": range(int(args["n_val"]))},
        membership={k.partition(".")[2]: v for k, v in a.items() if k.startswith("membership.")},
        saliency={int(k.partition(".")[2]): v for k, v in a.items() if k.startswith("saliency.")})
    splits = sorted({k.split(".")[1] for k in a if k.startswith("lesions.")})
    lesions = {sp: unpack_lesions(a, f"lesions.{sp}") for sp in splits}
    metrics, selection, curve = evaluate_g3(lf, lesions, args["P"], int(args["n_tok"]), int(args["seed"]))
    return Evaluation(metrics=metrics, extras={"selection": selection, "curve": curve})
