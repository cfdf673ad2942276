"""The gate recipes: each gate's record metrics as a pure function of its stored evaluation inputs.

Array names are flat strings (``.npz`` members): ``<split>.labels``, ``<split>.patients``,
``<split>.score.<arm>`` and so on. Helpers here pack and unpack the structures the eval modules take.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .localisation import SplitScores, evaluate_g1, paired_auroc_metrics
from .recompute import Evaluation, RecipeError, recipe
from . import gate_arch as _arch  # noqa: F401  (registers g4.certificate, g5.routing)
from . import gate_g3 as _g3  # noqa: F401  (registers g3.miss)
from . import gate_g6 as _g6  # noqa: F401  (registers g6.pruner)
from . import gate_g7 as _g7  # noqa: F401  (registers g7.change)
from . import g8 as _g8  # noqa: F401  (registers g8.probes, g8.segmentation)
from . import seed_mean as _seed_mean  # noqa: F401  (registers sweep.seed_mean)
from . import g9 as _g9  # noqa: F401  (registers g9.classifier)

__all__ = ["pack_split", "unpack_split"]


def pack_split(prefix: str, s: SplitScores) -> dict[str, np.ndarray]:
    """The arrays of one :class:`SplitScores` under ``prefix`` (labels, patients, images, one score per arm)."""
    out = {f"{prefix}.labels": np.asarray(s.labels), f"{prefix}.patients": np.asarray(s.patients).astype(str),
           f"{prefix}.images": np.asarray(s.images).astype(str)}
    for arm, v in s.scores.items():
        out[f"{prefix}.score.{arm}"] = np.asarray(v)
    return out


def unpack_split(arrays: Mapping[str, np.ndarray], prefix: str) -> SplitScores:
    """Inverse of :func:`pack_split`."""
    try:
        head = f"{prefix}.score."
        return SplitScores(scores={k[len(head):]: v for k, v in arrays.items() if k.startswith(head)},
                           labels=arrays[f"{prefix}.labels"], patients=arrays[f"{prefix}.patients"],
                           images=arrays[f"{prefix}.images"])
    except KeyError as exc:
        raise RecipeError(f"evaluation inputs lack array {exc.args[0]!r}") from None


@recipe("g1.localisation")
def g1_localisation(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G1: select the mid-layer arm on validation, paired patient-clustered bootstrap on test."""
    names = sorted({k.split(".")[1] for k in a if k.startswith("baseline.")})
    base = {n: (a[f"baseline.{n}.val"], a[f"baseline.{n}.test"]) for n in names}
    res = evaluate_g1(val=unpack_split(a, "val"), test=unpack_split(a, "test"), constructions=args["constructions"],
                      mid_blocks=args["mid_blocks"], final_block=int(args["final_block"]), baseline=base,
                      n_boot=int(args["n_boot"]), ci_level=float(args["ci_level"]), seed=int(args["seed"]))
    return Evaluation(metrics=res.metrics, extras={"table": res.table, "selection": res.selection})


@recipe("paired_auroc")
def paired_auroc(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """AUROC of named arms and their paired differences from one patient-clustered bootstrap on ``test``."""
    return Evaluation(metrics=paired_auroc_metrics(
        unpack_split(a, "test"), arms=dict(args["arms"]), diffs={k: tuple(v) for k, v in args["diffs"].items()},
        n_boot=int(args["n_boot"]), ci_level=float(args["ci_level"]), seed=int(args["seed"])))


@recipe("g2.modality")
def g2_modality(a: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """G2, one modality: density vs CLS-saliency AUROC (paired bootstrap) and the high-norm token fraction."""
    m = args["modality"]
    test = unpack_split(a, "test")
    out = paired_auroc_metrics(test, arms={f"auroc_density_{m}": "density", f"auroc_saliency_{m}": "saliency"},
                               diffs={f"delta_density_saliency_{m}": (f"auroc_density_{m}", f"auroc_saliency_{m}")},
                               n_boot=int(args["n_boot"]), ci_level=float(args["ci_level"]), seed=int(args["seed"]))
    out[f"high_norm_fraction_{m}"] = {"value": float(a["high_norm"].mean()), "ci": None, "ci_method": None,
                                      "n": {"tokens": int(test.labels.size)}, "unit": "fraction of test tokens",
                                      "description": "tokens with a norm above 4x their image's median (artefact check)"}
    return Evaluation(metrics=out)
