"""The aggregate of a sweep as a recipe: each metric is the mean over seeds with the t-based CI of the mean.

``covtoken aggregate`` computes an aggregate record's metrics through this recipe (``sweep.seed_mean``) and
stores its inputs (the per-seed values) like any run, so the audit recomputes an aggregate as it recomputes a
single run. The interval is ``mean ± t_{(1+level)/2, k-1} · sd / sqrt(k)`` (scipy.stats.t, never z); with fewer
than two seeds there is no sd and no CI.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .recompute import Evaluation, RecipeError, recipe

__all__ = ["seed_stats", "seed_mean_inputs"]


def seed_stats(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sd (ddof 1) and the t-based CI of the mean of ``values`` (the kit's t interval, as a dict that also
    covers fewer than two seeds).

    Returns:
        ``{"k", "mean", "sd", "df", "t_quantile", "ci"}``; ``sd``, ``df``, ``t_quantile`` and ``ci`` are None
        for fewer than two values, and ``mean`` too for none.
    """
    from .change_metrics import t_interval as t_ci  # the kit's one t interval

    x = np.asarray(list(values), dtype=float)
    k = int(x.size)
    out: dict[str, Any] = {"k": k, "mean": float(x.mean()) if k else None, "sd": None, "df": None,
                           "t_quantile": None, "ci": None}
    if k >= 2:
        ti = t_ci(x, level=level)
        out.update(mean=ti.mean, sd=ti.sd, df=ti.n - 1, t_quantile=ti.t_crit, ci=list(ti.ci))
    return out


def seed_mean_inputs(per_metric: Mapping[str, Mapping[str, Any]], level: float) -> tuple[dict, dict]:
    """Arrays and arguments of ``sweep.seed_mean``.

    Args:
        per_metric: metric name -> ``{"values": [per-seed value...], "n": {level: count}, "unit": str | None}``.
        level: the CI level.
    """
    names = sorted(per_metric)
    arrays = {f"values.{i}": np.asarray(per_metric[m]["values"], dtype=np.float64) for i, m in enumerate(names)}
    args = {"ci_level": level, "metrics": [{"name": m, "n": dict(per_metric[m]["n"]),
                                            "unit": per_metric[m].get("unit")} for m in names]}
    return arrays, args


@recipe("sweep.seed_mean")
def seed_mean(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    level = float(args["ci_level"])
    metrics, stats = {}, {}
    for i, spec in enumerate(args["metrics"]):
        key = f"values.{i}"
        if key not in a:
            raise RecipeError(f"sweep.seed_mean: no array {key} for metric {spec['name']}")
        st = seed_stats(a[key].tolist(), level)
        sd = "n/a (fewer than 2 seeds)" if st["sd"] is None else f"{st['sd']:.4f}"
        m = {"value": st["mean"], "ci": st["ci"], "ci_level": level,
             "ci_method": None if st["ci"] is None else (
                 f"t-interval of the mean over {st['k']} seeds (scipy.stats.t, df={st['df']}); "
                 "per-seed values in aggregate.json"),
             "n": {k: int(v) for k, v in sorted(spec["n"].items())},
             "description": f"mean ± sd over {st['k']} seed(s): "
                            f"{'n/a' if st['mean'] is None else format(st['mean'], '.4f')} ± {sd}"}
        if spec.get("unit") is not None:
            m["unit"] = spec["unit"]
        metrics[spec["name"]] = m
        stats[spec["name"]] = st
    return Evaluation(metrics=metrics, extras={"stats": stats})
