"""G7 evaluation: changing pairs (built from the sealed diagnosis), pair scores, selection on validation,
and lesion-clustered test metrics of the probe against the strongest validation-chosen baseline.

Pairs of one evaluation split (validation or test), all on the held-out nuisance family:

* stable: (lesion a's image, a's held-out-family view) - the same lesion, a new acquisition;
* changing: (lesion a's image, b's held-out-family view) and (b's image, a's view), where a and b are two
  different lesions of the same split with the same diagnosis and site. Lesions of each (dx, site) stratum
  are shuffled from the seed and coupled in order; an odd one out has only its stable pair. The diagnosis
  is read here, through :func:`covtoken.data.layout.unseal_labels`; changing pairs exist only in evaluation
  and never reach training.

Resampling unit: a lesion cluster = a connected component of the graph whose edges are the changing pairs
(a coupled lesion pair, or a single unmatched lesion). Every pair lies inside one cluster, and no lesion is
in two clusters, so resampling clusters is a bootstrap over lesions that keeps each pair's two lesions
together (pairs are never the unit).

Protocol: the baseline (pixel L2, SSIM distance, raw cosine distance) with the highest *validation* AUROC
is "the strongest baseline"; the probe head with the highest mean validation AUROC over training seeds is
the probe. On test, one set of lesion-cluster draws covers every arm and metric; the probe's value in each
resample is the mean over its seeds. Nothing is chosen on test. AUROC is directional (changing = positive)
and never flipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..data.layout import EvalMasks, unseal_labels
from .change_baselines import pair_pixel_scores
from .bootstrap import percentile_ci
from .change_metrics import auroc_w, eer_threshold, lesion_bootstrap, t_interval

__all__ = ["EvalLesions", "ChangePairs", "build_pairs", "lesion_clusters", "score_pairs", "G7Result",
           "evaluate_g7", "BASELINES"]

BASELINES = ("pixel_l2", "ssim_distance", "raw_cosine")
_METRICS = ("auroc", "auprc", "eer", "fpr_at_tpr80")


@dataclass(frozen=True)
class EvalLesions:
    """The lesions of one evaluation split and their label-free material.

    Attributes:
        reps: lesion id -> representative image id.
        sites: lesion id -> site.
        patients: lesion id -> patient id.
        view_of: representative image id -> key of its held-out-family view.
    """

    reps: Mapping[str, str]
    sites: Mapping[str, str]
    patients: Mapping[str, str]
    view_of: Mapping[str, str]


@dataclass(frozen=True)
class ChangePairs:
    """Evaluation pairs of one split (row-aligned arrays).

    Attributes:
        context: (n,) context image ids.
        target: (n,) target view keys.
        label: (n,) int8, 1 = changing, 0 = stable.
        lesion_context, lesion_target: (n,) lesion ids.
        cluster: (n,) int lesion-cluster index (the bootstrap unit).
        n_lesions, n_patients: lesions and patients of the split.
        unmatched: lesions without a changing partner.
    """

    context: np.ndarray
    target: np.ndarray
    label: np.ndarray
    lesion_context: np.ndarray
    lesion_target: np.ndarray
    cluster: np.ndarray
    n_lesions: int
    n_patients: int
    unmatched: tuple[str, ...] = field(default=())

    @property
    def n_changing(self) -> int:
        return int(self.label.sum())


def _dx(masks: EvalMasks, image_id: str) -> str:
    labels = unseal_labels(masks[image_id])
    if "dx" not in labels:
        raise KeyError(f"image {image_id!r}: no sealed 'dx' label (have {sorted(labels)}); changing pairs are "
                       "matched on diagnosis")
    return str(labels["dx"])


def lesion_clusters(lesion_a: Sequence[str], lesion_b: Sequence[str]) -> np.ndarray:
    """Connected components of the lesion graph with an edge per pair (a, b).

    Returns:
        (n,) int component index per pair, numbered in order of first appearance.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(lesion_a, lesion_b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(find(a), len(ids)) for a in lesion_a], dtype=np.int64)


def build_pairs(lesions: EvalLesions, masks: EvalMasks, *, seed: int) -> ChangePairs:
    """Stable and changing pairs of one evaluation split (see the module docstring).

    Args:
        lesions: the split's lesions, representatives, sites and held-out views.
        masks: sealed masks carrying ``dx``.
        seed: shuffles lesions within each (dx, site) stratum before coupling.
    """
    strata: dict[tuple[str, str], list[str]] = {}
    for lid in sorted(lesions.reps):
        strata.setdefault((_dx(masks, lesions.reps[lid]), lesions.sites[lid]), []).append(lid)
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, int, str, str]] = []
    unmatched = []
    for lid in sorted(lesions.reps):
        rep = lesions.reps[lid]
        rows.append((rep, lesions.view_of[rep], 0, lid, lid))
    for key in sorted(strata):
        members = [strata[key][i] for i in rng.permutation(len(strata[key]))]
        if len(members) % 2:
            unmatched.append(members.pop())
        for a, b in zip(members[0::2], members[1::2]):
            ra, rb = lesions.reps[a], lesions.reps[b]
            rows.append((ra, lesions.view_of[rb], 1, a, b))
            rows.append((rb, lesions.view_of[ra], 1, b, a))
    ctx, tgt, lab, la, lb = (np.array(c) for c in zip(*rows))
    return ChangePairs(context=ctx, target=tgt, label=lab.astype(np.int8), lesion_context=la, lesion_target=lb,
                       cluster=lesion_clusters(la.tolist(), lb.tolist()), n_lesions=len(lesions.reps),
                       n_patients=len(set(lesions.patients.values())), unmatched=tuple(sorted(unmatched)))


def score_pairs(pairs: ChangePairs, *, embeddings: np.ndarray, row_of: Mapping[str, int],
                predictors: Mapping[str, Callable[[np.ndarray], np.ndarray]], images: Mapping[str, np.ndarray],
                pixel_size: int = 128) -> dict[str, np.ndarray]:
    """Change scores of every pair for every arm (higher = more changed).

    Args:
        pairs: from :func:`build_pairs`.
        embeddings: (m, d) L2-normalised embeddings of every image and view.
        row_of: image id or view key -> row of ``embeddings``.
        predictors: arm name -> ``g``, mapping (n, d) context embeddings to (n, d) predictions.
        images: image id or view key -> pixels (for the pixel baselines).
        pixel_size: common side for pixel baselines when a pair's shapes differ.

    Returns:
        ``{arm: (n,)}`` with every predictor arm and the baselines ``pixel_l2``, ``ssim_distance``, ``raw_cosine``.
    """
    zc = embeddings[[row_of[k] for k in pairs.context]]
    zt = embeddings[[row_of[k] for k in pairs.target]]

    def cos_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        cos = np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return 1.0 - np.clip(cos, -1.0, 1.0)

    out = {name: cos_dist(g(zc), zt) for name, g in predictors.items()}
    out.update(pair_pixel_scores([images[k] for k in pairs.context], [images[k] for k in pairs.target],
                                 size=pixel_size))
    out["raw_cosine"] = cos_dist(zc, zt)
    return out


@dataclass(frozen=True)
class G7Result:
    """Record metrics, the validation/test table and what was selected on validation."""

    metrics: dict
    table: list[dict]
    selection: dict


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    return float(auroc_w(y.astype(bool), np.asarray(s, np.float64), np.ones((1, y.size)))[0])


def _ci(samples: np.ndarray, level: float) -> list[float]:
    return list(percentile_ci(samples, level))


def evaluate_g7(*, val: ChangePairs, test: ChangePairs, val_scores: Mapping[str, np.ndarray],
                test_scores: Mapping[str, np.ndarray], heads: Mapping[str, Sequence[str]], n_boot: int,
                ci_level: float, seed: int, reported: Sequence[str] = ()) -> G7Result:
    """Select the baseline and the probe head on validation; judge them on test.

    Args:
        val, test: pairs of the two evaluation splits.
        val_scores, test_scores: arm -> (n,) scores (every arm of ``heads`` and every :data:`BASELINES`).
        heads: head name -> its per-seed arm names (at least 2 seeds for the t interval).
        n_boot: lesion-cluster resamples.
        ci_level: nominal coverage of every interval.
        seed: bootstrap seed.
        reported: further arms (e.g. ``"published"``, a published predictor) reported on test beside the probe
            and the baseline, with the same resamples: ``<arm>_auroc`` and ``delta_<arm>_baseline_auroc``. They take
            no part in any selection and no criterion reads them.

    Returns:
        :class:`G7Result` with the record metrics.
    """
    yv, yt = val.label.astype(bool), test.label.astype(bool)
    table = [{"split": name, "arm": arm, "auroc": _auroc(y, sc[arm])}
             for name, y, sc in (("val", yv, val_scores), ("test", yt, test_scores))
             for arm in [*BASELINES, *(a for arms in heads.values() for a in arms), *reported]]
    val_auroc = {r["arm"]: r["auroc"] for r in table if r["split"] == "val"}
    base = max(BASELINES, key=lambda b: (val_auroc[b], -BASELINES.index(b)))
    head_val = {h: float(np.mean([val_auroc[a] for a in arms])) for h, arms in heads.items()}
    head = max(sorted(heads), key=lambda h: head_val[h])
    seeds = list(heads[head])
    arms = {a: test_scores[a] for a in seeds} | {b: test_scores[b] for b in BASELINES} | {
        a: test_scores[a] for a in reported}
    boot = lesion_bootstrap(yt, arms, test.cluster, metrics=_METRICS, n_boot=n_boot, seed=seed)
    probe = {m: np.mean([boot[a][m] for a in seeds], axis=0) for m in _METRICS}

    n = {"lesions": test.n_lesions, "patients": test.n_patients, "images": int(len(set(test.context.tolist()))
                                                                               + len(set(test.target.tolist()))),
         "resamples": int(n_boot)}
    method = ("lesion-clustered (lesion pairs joined by a changing pair form one cluster), class-stratified, paired "
              "percentile bootstrap over test lesions")
    pair_desc = f"{yt.size} test pairs ({int(yt.sum())} changing), {test.n_lesions} lesions"

    def metric(samples: np.ndarray, desc: str, unit: str = "AUROC") -> dict:
        return {"value": float(samples[0]), "ci": _ci(samples[1:], ci_level), "ci_level": ci_level,
                "ci_method": method, "n": dict(n), "unit": unit, "description": f"{desc}; {pair_desc}"}

    probe_desc = f"probe {head} (selected on validation), mean over {len(seeds)} training seeds"
    base_desc = f"strongest baseline on validation: {base}"
    metrics = {
        "probe_auroc": metric(probe["auroc"], f"directional test AUROC (changing = positive, never flipped) of the "
                                              f"{probe_desc}"),
        "baseline_auroc": metric(boot[base]["auroc"], f"directional test AUROC of the {base_desc}"),
        "delta_probe_baseline_auroc": metric(probe["auroc"] - boot[base]["auroc"],
                                             f"paired test AUROC difference, probe minus {base_desc}",
                                             unit="AUROC difference"),
        "probe_auprc": metric(probe["auprc"], f"test AUPRC (changing = positive) of the {probe_desc}", "AUPRC"),
        "probe_eer": metric(probe["eer"], f"test equal error rate of the {probe_desc}", "rate"),
        "probe_fpr_at_tpr80": metric(probe["fpr_at_tpr80"], f"test FPR at TPR >= 0.8 of the {probe_desc}", "rate"),
        "baseline_auprc": metric(boot[base]["auprc"], f"test AUPRC of the {base_desc}", "AUPRC"),
        "baseline_eer": metric(boot[base]["eer"], f"test equal error rate of the {base_desc}", "rate"),
        "baseline_fpr_at_tpr80": metric(boot[base]["fpr_at_tpr80"], f"test FPR at TPR >= 0.8 of the {base_desc}",
                                        "rate"),
    }
    for b in BASELINES:
        metrics[f"{b}_auroc"] = metric(boot[b]["auroc"], f"directional test AUROC of baseline {b} on the held-out "
                                                         "family (reported for every baseline)")
    for a in reported:
        metrics[f"{a}_auroc"] = metric(boot[a]["auroc"], f"directional test AUROC of the {a} predictor (reported, "
                                                         "not judged)")
        metrics[f"delta_{a}_baseline_auroc"] = metric(boot[a]["auroc"] - boot[base]["auroc"],
                                                      f"paired test AUROC difference, {a} predictor minus {base_desc}",
                                                      unit="AUROC difference")
    per_seed = [float(boot[a]["auroc"][0]) for a in seeds]
    ti = t_interval(per_seed, level=ci_level)
    metrics["probe_auroc_seed_sweep"] = {
        "value": ti.mean, "ci": list(ti.ci), "ci_level": ci_level,
        "ci_method": f"t-based CI of the mean over {ti.n} training seeds (t = {ti.t_crit:.4f}, df = {ti.n - 1}); "
                     "optimisation variance only: data, split and pairs fixed",
        "n": {"lesions": test.n_lesions, "patients": test.n_patients},
        "unit": "AUROC", "description": f"test AUROC of {head} over seeds: mean {ti.mean:.4f} +/- sd {ti.sd:.4f}; "
                                        f"per seed {[round(v, 4) for v in per_seed]}"}
    eer_thr = {a: eer_threshold(yt, test_scores[a]) for a in [*seeds, base]}
    selection = {
        "baseline": {"chosen": base, "rule": "highest validation AUROC among " + ", ".join(BASELINES),
                     "val_auroc": {b: val_auroc[b] for b in BASELINES}},
        "probe_head": {"chosen": head, "rule": "highest mean validation AUROC over training seeds",
                       "val_auroc_mean": head_val, "seed_arms": seeds},
        "inverted_on_test": {a: bool(boot[a]["auroc"][0] < 0.5) for a in arms},
        "eer_test": {a: {"eer": e, "threshold": t} for a, (e, t) in eer_thr.items()},
        "pairs": {split: {"pairs": int(p.label.size), "changing": p.n_changing, "lesions": p.n_lesions,
                          "clusters": int(p.cluster.max() + 1), "unmatched_lesions": len(p.unmatched)}
                  for split, p in (("val", val), ("test", test))},
        "score_means_test": {a: {"stable": float(np.mean(arms[a][~yt])), "changing": float(np.mean(arms[a][yt]))}
                             for a in arms},
    }
    return G7Result(metrics=metrics, table=table, selection=selection)
