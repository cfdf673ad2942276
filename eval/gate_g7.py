"""Recipe ``g7.change``: G7's record metrics recomputed from the stored pairs and pair scores.

The pair scores (probe heads, baselines) are label-free outputs stored as inputs; the selection on
validation and every test metric are recomputed through :func:`covtoken.eval.change.evaluate_g7`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .change import ChangePairs, evaluate_g7
from .recompute import Evaluation, recipe

__all__ = ["g7_inputs"]


_PAIR_ARRAYS = ("context", "target", "label", "lesion_context", "lesion_target", "cluster")


def g7_inputs(*, pairs: Mapping[str, ChangePairs], scores: Mapping[str, Mapping[str, np.ndarray]],
              heads: Mapping[str, Sequence[str]], n_boot: int, ci_level: float, seed: int) -> tuple[dict, dict]:
    """Arrays and arguments of recipe ``g7.change`` (pairs and scores of the val and test splits)."""
    arrays: dict[str, np.ndarray] = {}
    sizes = {}
    for sp in ("val", "test"):
        p = pairs[sp]
        for k in _PAIR_ARRAYS:
            v = np.asarray(getattr(p, k))
            arrays[f"{sp}.{k}"] = v.astype(str) if v.dtype == object else v
        arrays.update({f"{sp}.score.{arm}": np.asarray(s) for arm, s in scores[sp].items()})
        sizes[sp] = {"n_lesions": int(p.n_lesions), "n_patients": int(p.n_patients), "unmatched": list(p.unmatched)}
    return arrays, {"sizes": sizes, "heads": {h: list(v) for h, v in heads.items()}, "n_boot": int(n_boot),
                    "ci_level": float(ci_level), "seed": int(seed)}


@recipe("g7.change")
def g7_change(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G7: baseline and probe head selected on validation, judged on test (lesion-clustered bootstrap)."""

    def split(sp: str) -> tuple[ChangePairs, dict[str, np.ndarray]]:
        s = args["sizes"][sp]
        p = ChangePairs(**{k: a[f"{sp}.{k}"] for k in _PAIR_ARRAYS}, n_lesions=int(s["n_lesions"]),
                        n_patients=int(s["n_patients"]), unmatched=tuple(s["unmatched"]))
        head = f"{sp}.score."
        return p, {k[len(head):]: v for k, v in a.items() if k.startswith(head)}

    (val, vs), (test, ts) = split("val"), split("test")
    res = evaluate_g7(val=val, test=test, val_scores=vs, test_scores=ts, heads=args["heads"], n_boot=int(args["n_boot"]),
                      ci_level=float(args["ci_level"]), seed=int(args["seed"]))
    return Evaluation(metrics=res.metrics, extras={"selection": res.selection, "table": res.table})
