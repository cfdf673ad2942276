"""G5 numbers from keep sets and lesion token indices: small-lesion sensitivity, the random baseline, the curve.

Inputs are plain arrays (the job turns masks into per-lesion token indices inside ``covtoken.eval`` first); this
module only counts. A lesion is *routed* when at least one token it touches is among the patch tokens that go
through every block; *small* when its area is at most ``small_lesion_max_area_tokens`` tokens. Sensitivities are
ratios of sums over patients with patient-clustered percentile intervals, all from one count matrix so that
differences (membership minus random routing) are paired.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .flops import keep_count
from .routed_depth import RoutedDepth, lesion_routing, top_keep
from .summaries import CLUSTER_METHOD, clustered_ratio, metric

__all__ = ["RoutingResult", "per_patient_routing", "routing_metrics"]


@dataclass(frozen=True)
class RoutingResult:
    metrics: dict
    curve: dict
    notes: list[str]


def per_patient_routing(kept: np.ndarray, lesions: Sequence[Sequence[np.ndarray]], areas: Sequence[Sequence[float]],
                        patient_index: np.ndarray, n_patients: int, n_patches: int, *,
                        max_area: float | None) -> dict[str, np.ndarray]:
    """Per-patient sums for lesions with area ``<= max_area`` tokens (all lesions when ``max_area`` is None).

    Args:
        kept: ``(n_images, K)`` routed patch tokens.
        lesions: per image, token indices of each lesion.
        areas: per image, area in tokens of each lesion (same nesting as ``lesions``).
        patient_index: ``(n_images,)`` patient index in ``[0, n_patients)``.
        n_patients: number of patients (clusters).
        n_patches: N.
        max_area: small-lesion cut-off in tokens, or None.

    Returns:
        ``{"lesions", "hits", "random"}``, each ``(n_patients,)``: lesion count, routed lesions, expected routed
        lesions under uniform random routing of the same K tokens.
    """
    hit, p_rand, image = lesion_routing(kept, lesions, n_patches)
    area = np.array([a for per in areas for a in per], dtype=np.float64)
    if area.size != hit.size:
        raise ValueError(f"{area.size} areas for {hit.size} lesions")
    sel = np.ones(hit.size, bool) if max_area is None else area <= max_area
    pat = np.asarray(patient_index)[image[sel]]
    return {"lesions": np.bincount(pat, minlength=n_patients).astype(np.float64),
            "hits": np.bincount(pat, weights=hit[sel].astype(np.float64), minlength=n_patients),
            "random": np.bincount(pat, weights=p_rand[sel], minlength=n_patients)}


def routing_metrics(*, rd: RoutedDepth, kept: np.ndarray, bank_kept: np.ndarray, scores: Mapping[int, np.ndarray],
                    lesions: Sequence[Sequence[np.ndarray]], areas: Sequence[Sequence[float]], patients: np.ndarray,
                    patient_order: Sequence[str], counts: np.ndarray, macs: Mapping[str, Any],
                    timing: Mapping[str, float], P: Mapping[str, Any], device: str) -> RoutingResult:
    """Record metrics, curve and notes of G5.

    Args:
        rd: the routed model at the locked operating point.
        kept: ``(n_test_images, K)`` keep sets produced by the routed forward.
        bank_kept: ``(n_test_images, K)`` keep sets from the token bank's float64 scores (agreement check).
        scores: ``{k: (n_test_images, N)}`` router scores at every candidate exit block.
        lesions, areas: per test image, token indices and areas (tokens) of each lesion.
        patients: ``(n_test_images,)`` patient id of each test image.
        patient_order: the test patients, in the column order of ``counts``.
        counts: ``(B, n_test_patients)`` cluster-bootstrap counts.
        macs: analytic and counted MACs of one batch (keys ``full_analytic``, ``routed_analytic``,
            ``full_counted``, ``routed_counted``, ``batch``).
        timing: :func:`~covtoken.arch.routed_depth.time_forwards` output.
        P: locked parameters (``small_lesion_max_area_tokens``, ``curve_keep_fractions``, ``ci_level``).
        device: where the forwards ran.
    """
    level = float(P["ci_level"])
    n_pat = len(patient_order)
    lookup = {p: i for i, p in enumerate(patient_order)}
    pidx = np.array([lookup[p] for p in patients], dtype=np.int64)
    small = float(P["small_lesion_max_area_tokens"])
    n_patch = rd.n_patches
    op = per_patient_routing(kept, lesions, areas, pidx, n_pat, n_patch, max_area=small)
    allp = per_patient_routing(kept, lesions, areas, pidx, n_pat, n_patch, max_area=None)
    if op["lesions"].sum() == 0:
        raise ValueError(f"no test lesion has an area <= {small} tokens; small-lesion sensitivity is undefined")
    n_small = {"patients": n_pat, "images": int(len(patients)), "lesions": int(op["lesions"].sum()),
               "resamples": int(counts.shape[0])}
    sens = clustered_ratio(op["hits"], op["lesions"], counts, ci_level=level)
    rand = clustered_ratio(op["random"], op["lesions"], counts, ci_level=level)
    gain = clustered_ratio(op["hits"] - op["random"], op["lesions"], counts, ci_level=level)
    every = clustered_ratio(allp["hits"], allp["lesions"], counts, ci_level=level)
    full_pi, routed_pi = rd.full_macs(), rd.routed_macs()
    g = rd.geometry
    blocks_full = full_pi - g.patch_macs
    blocks_routed = routed_pi - g.patch_macs - g.n_patches * int(rd.router.macs_per_token)
    mismatch = max(abs(macs["full_counted"] - macs["full_analytic"]) / macs["full_analytic"],
                   abs(macs["routed_counted"] - macs["routed_analytic"]) / macs["routed_analytic"])
    where = f"exit after block {rd.exit_after}, keep {rd.keep} ({rd.n_keep} of {n_patch} patch tokens)"
    n_geo = {"tokens": n_patch + rd.num_prefix}
    m = {
        "flops_ratio": metric(full_pi / routed_pi, n=n_geo, unit="x (full / routed MACs)",
                              description=f"analytic MACs of the full forward over the routed one ({where}); "
                              "patch embedding and router included"),
        "flops_ratio_blocks_only": metric(blocks_full / blocks_routed, n=n_geo, unit="x",
                                          description="the same ratio over the blocks alone (the notes' closed form)"),
        "gmacs_full": metric(full_pi / 1e9, n=n_geo, unit="GMACs per image", description="full forward, analytic"),
        "gmacs_routed": metric(routed_pi / 1e9, n=n_geo, unit="GMACs per image",
                               description=f"routed forward incl. router ({rd.router.macs_per_token} MACs per token)"),
        "macs_count_mismatch": metric(mismatch, n={"images": int(macs["batch"])}, unit="relative error",
                                      description="largest |counted - analytic| / analytic over the full and routed "
                                      "forwards (matmul-class aten ops counted while running)"),
        "wallclock_speedup": metric(timing["speedup"], n={"images": int(timing["batch"])}, unit="x (full / routed time)",
                                    description=f"median of {timing['repeats']} interleaved timings on {device}; "
                                    "gather/scatter and Python overhead included"),
        "small_lesion_sensitivity": metric(sens[0], ci=sens[1], ci_level=level, ci_method=CLUSTER_METHOD, n=n_small,
                                           unit="fraction of small lesions",
                                           description=f"small lesions (area <= {small} tokens) with >= 1 token "
                                           f"routed through all blocks; {where}"),
        "small_lesion_sensitivity_random": metric(rand[0], ci=rand[1], ci_level=level, ci_method=CLUSTER_METHOD,
                                                  n=n_small, unit="fraction of small lesions",
                                                  description="expected under uniform random routing of the same K"),
        "small_lesion_gain_over_random": metric(gain[0], ci=gain[1], ci_level=level,
                                                ci_method=CLUSTER_METHOD + " (paired difference)", n=n_small,
                                                unit="difference of fractions",
                                                description="membership routing minus random routing"),
        "lesion_sensitivity_all": metric(every[0], ci=every[1], ci_level=level, ci_method=CLUSTER_METHOD,
                                         n={**n_small, "lesions": int(allp["lesions"].sum())},
                                         unit="fraction of lesions", description="every lesion size"),
        "router_agreement": metric(float(np.mean([np.intersect1d(a, b).size / rd.n_keep
                                                  for a, b in zip(kept, bank_kept)])), n={"images": int(len(kept))},
                                   unit="fraction", description="overlap of the routed forward's keep sets (float32 "
                                   "router) with those from the token bank's float64 scores"),
    }
    points = []
    for k in sorted(scores):
        for f in P["curve_keep_fractions"]:
            n_keep = keep_count(n_patch, float(f))
            ks = top_keep(scores[k], n_keep)
            pp = per_patient_routing(ks, lesions, areas, pidx, n_pat, n_patch, max_area=small)
            s = clustered_ratio(pp["hits"], pp["lesions"], counts, ci_level=level)
            gr = clustered_ratio(pp["hits"] - pp["random"], pp["lesions"], counts, ci_level=level)
            routed = g.routed_macs(exit_after=k, n_keep=n_keep, router_macs_per_token=int(rd.router.macs_per_token))
            points.append({"exit_after": int(k), "keep_fraction": float(f), "n_keep": n_keep,
                           "flops_ratio": full_pi / routed, "small_lesion_sensitivity": s[0],
                           "small_lesion_sensitivity_ci": list(s[1]), "gain_over_random": gr[0],
                           "gain_over_random_ci": list(gr[1])})
    curve = {"small_lesion_max_area_tokens": small, "ci_level": level, "ci_method": CLUSTER_METHOD,
             "operating_point": {"exit_after": rd.exit_after, "keep_fraction": rd.keep}, "points": points}
    notes = [f"{where}: {full_pi / routed_pi:.3f}x fewer MACs, small-lesion sensitivity {sens[0]:.3f} "
             f"[{sens[1][0]:.3f}, {sens[1][1]:.3f}], wall-clock {timing['speedup']:.2f}x on {device}"]
    if mismatch > 0:
        notes.append(f"analytic MACs differ from the counted ones by {mismatch:.3g} (see macs.json)")
    return RoutingResult(metrics=m, curve=curve, notes=notes)
