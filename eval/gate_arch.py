"""Recipes of the architecture gates: G4 (conformal retention certificate) and G5 (routed depth).

Each rebuilds the inputs of the gate's evaluation function from stored arrays and arguments, so the audit
recomputes the record's metrics through the same function the job called (:mod:`covtoken.eval.recompute`).
Measured quantities that cannot be recomputed (G5's wall-clock timing, the directly counted MACs) are stored
as arguments and enter the metrics as measured.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np

from .bootstrap import draw_cluster_counts
from .recompute import Evaluation, recipe

__all__ = ["g4_inputs", "g5_inputs"]

_RETENTION = ("lesion_scores", "lesion_unit", "lesion_group", "token_scores", "token_unit", "unit_ids")


def g4_inputs(units: Any, *, cal_units: np.ndarray, test_units: np.ndarray, P: Mapping[str, Any],
              seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and arguments of recipe ``g4.certificate``."""
    arrays = {f"units.{k}": np.asarray(getattr(units, k)) for k in _RETENTION}
    arrays["units.unit_ids"] = arrays["units.unit_ids"].astype(str)
    arrays.update({"cal_units": np.asarray(cal_units), "test_units": np.asarray(test_units)})
    args = {"alpha": float(P["alpha"]), "bound": float(P["loss_bound"]), "n_splits": int(P["n_splits"]),
            "seed": int(seed), "ci_level": float(P["ci_level"]), "calibrate_on": P["calibrate_on"],
            "n_boot": int(P["n_boot"])}
    return arrays, args


@recipe("g4.certificate")
def g4_certificate(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G4: certificates calibrated on the calibration patients, coverage and kept fraction on test patients."""
    from ..arch.conformal import RetentionData, evaluate_certificate

    units = RetentionData(**{k: a[f"units.{k}"] for k in _RETENTION})
    test = a["test_units"]
    counts = draw_cluster_counts([np.arange(test.size)], test.size, int(args["n_boot"]), int(args["seed"]))
    res = evaluate_certificate(units, cal_units=a["cal_units"], test_units=test, counts=counts,
                               alpha=float(args["alpha"]), bound=float(args["bound"]), n_splits=int(args["n_splits"]),
                               seed=int(args["seed"]), ci_level=float(args["ci_level"]),
                               calibrate_on=args["calibrate_on"])
    return Evaluation(metrics=res.metrics, extras={"details": res.details})


def _pack_nested(prefix: str, nested: Sequence[Sequence[Any]], areas: Sequence[Sequence[float]]) -> dict:
    per_image = np.array([len(x) for x in nested], dtype=np.int64)
    flat = [np.asarray(t, dtype=np.int64) for per in nested for t in per]
    return {f"{prefix}.per_image": per_image, f"{prefix}.lengths": np.array([t.size for t in flat], dtype=np.int64),
            f"{prefix}.tokens": np.concatenate(flat) if flat else np.zeros(0, np.int64),
            f"{prefix}.areas": np.array([float(x) for per in areas for x in per], dtype=np.float64)}


def _unpack_nested(a: Mapping[str, np.ndarray], prefix: str) -> tuple[list[list[np.ndarray]], list[list[float]]]:
    lens, per_image = a[f"{prefix}.lengths"], a[f"{prefix}.per_image"]
    flat = np.split(a[f"{prefix}.tokens"], np.cumsum(lens)[:-1]) if lens.size else []
    area = a[f"{prefix}.areas"].tolist()
    out, out_a, i = [], [], 0
    for n in per_image.tolist():
        out.append(list(flat[i:i + n]))
        out_a.append(area[i:i + n])
        i += n
    return out, out_a


def g5_inputs(*, rd: Any, kept: np.ndarray, bank_kept: np.ndarray, scores: Mapping[int, np.ndarray],
              lesions: Sequence[Sequence[np.ndarray]], areas: Sequence[Sequence[float]], patients: np.ndarray,
              patient_order: Sequence[str], macs: Mapping[str, Any], timing: Mapping[str, float],
              P: Mapping[str, Any], device: str, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and arguments of recipe ``g5.routing`` (the routed model enters through its geometry only)."""
    arrays = {"kept": np.asarray(kept), "bank_kept": np.asarray(bank_kept), "patients": np.asarray(patients).astype(str),
              **{f"scores.{k}": np.asarray(v) for k, v in scores.items()}, **_pack_nested("lesions", lesions, areas)}
    args = {"rd": {"exit_after": int(rd.exit_after), "keep": float(rd.keep), "n_keep": int(rd.n_keep),
                   "n_patches": int(rd.n_patches), "num_prefix": int(rd.num_prefix),
                   "router_macs_per_token": int(rd.router.macs_per_token),
                   "geometry": dataclasses.asdict(rd.geometry)},
            "patient_order": list(patient_order), "macs": dict(macs), "timing": dict(timing), "device": device,
            "P": {k: P[k] for k in ("small_lesion_max_area_tokens", "curve_keep_fractions", "ci_level", "n_boot")
                  if k in P}, "seed": int(seed)}
    return arrays, args


@recipe("g5.routing")
def g5_routing(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G5: small-lesion sensitivity of the routed keep sets vs MACs, patient-clustered CIs."""
    from ..arch.flops import ViTGeometry
    from ..arch.routing_eval import routing_metrics

    r = args["rd"]
    g = ViTGeometry(**{**r["geometry"], "linear_per_token": tuple(r["geometry"]["linear_per_token"])})
    rd = SimpleNamespace(exit_after=r["exit_after"], keep=r["keep"], n_keep=r["n_keep"], n_patches=r["n_patches"],
                         num_prefix=r["num_prefix"], geometry=g,
                         router=SimpleNamespace(macs_per_token=r["router_macs_per_token"]),
                         full_macs=lambda batch=1: g.full_macs(batch),
                         routed_macs=lambda batch=1: g.routed_macs(exit_after=r["exit_after"], n_keep=r["n_keep"],
                                                                   router_macs_per_token=r["router_macs_per_token"],
                                                                   batch=batch))
    order = args["patient_order"]
    counts = draw_cluster_counts([np.arange(len(order))], len(order), int(args["P"]["n_boot"]), int(args["seed"]))
    lesions, areas = _unpack_nested(a, "lesions")
    scores = {int(k.partition(".")[2]): v for k, v in a.items() if k.startswith("scores.")}
    res = routing_metrics(rd=rd, kept=a["kept"], bank_kept=a["bank_kept"], scores=scores, lesions=lesions,
                          areas=areas, patients=a["patients"], patient_order=order, counts=counts,
                          macs=args["macs"], timing=args["timing"], P=args["P"], device=args["device"])
    return Evaluation(metrics=res.metrics, extras={"curve": res.curve, "notes": res.notes})
