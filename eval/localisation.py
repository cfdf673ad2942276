"""G1 evaluation: token-level lesion AUROC per block and construction, selection on validation, paired test.

Protocol (pure functions; the job passes arrays in, gets metrics out):

1. Every scored arm ``"<construction>@<block>"`` gets its validation AUROC.
2. The mid-layer arm with the best *validation* AUROC is selected (ties: lower block, then name); the final
   block arm of the same construction is its comparison. The intensity baseline's sign (bright or dark) is
   chosen on validation too. Nothing is selected on test.
3. On test patients one patient-clustered, class-stratified paired bootstrap covers all arms at once, so
   every CI and every difference (mid - final, mid - baseline) uses the same resamples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from .bootstrap import clustered_bootstrap_auroc, percentile_ci

__all__ = ["SplitScores", "G1Result", "evaluate_g1", "arm_name", "percentile_ci", "paired_auroc_metrics",
           "mid_layer_blocks"]

#: The rule of the first locked G1 entries: every block but the final one is a "mid-layer" candidate.
EVERY_BLOCK_BEFORE_FINAL = "every block before the final one"


def mid_layer_blocks(rule: str | dict, depth: int) -> list[int]:
    """The mid-layer candidate blocks a locked rule names, for a backbone with ``depth`` blocks.

    Args:
        rule: ``"every block before the final one"`` (blocks ``0 .. depth-2``), or
            ``{"first": i, "last_before_final": j}`` (blocks ``i .. depth-1-j``, both ends included).
        depth: number of blocks.

    Raises:
        ValueError: an unknown rule, or a range that is empty or reaches the final block.
    """
    if rule == EVERY_BLOCK_BEFORE_FINAL:
        blocks = list(range(depth - 1))
    elif isinstance(rule, dict) and set(rule) == {"first", "last_before_final"}:
        blocks = list(range(int(rule["first"]), depth - int(rule["last_before_final"])))
    else:
        raise ValueError(f"unknown mid-layer rule {rule!r}; use {EVERY_BLOCK_BEFORE_FINAL!r} or "
                         "{'first': i, 'last_before_final': j}")
    if not blocks or blocks[0] < 0 or blocks[-1] >= depth - 1:
        raise ValueError(f"mid-layer rule {rule!r} gives blocks {blocks} for depth {depth}: empty or not before the final")
    return blocks


def arm_name(construction: str, block: int) -> str:
    return f"{construction}@{block}"


@dataclass(frozen=True)
class SplitScores:
    """Scores of one split, flattened over images and tokens.

    Attributes:
        scores: arm name -> ``(n,)`` scores (higher = more lesion-like).
        labels: ``(n,)`` int8, 1 lesion, 0 background, -1 excluded.
        patients: ``(n,)`` patient id per token.
        images: ``(n,)`` image id per token.
    """

    scores: Mapping[str, np.ndarray]
    labels: np.ndarray
    patients: np.ndarray
    images: np.ndarray

    def valid(self) -> np.ndarray:
        return self.labels >= 0


@dataclass(frozen=True)
class G1Result:
    metrics: dict
    table: list[dict]
    selection: dict


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s))


def evaluate_g1(*, val: SplitScores, test: SplitScores, constructions: Sequence[str], mid_blocks: Sequence[int],
                final_block: int, baseline: Mapping[str, tuple[np.ndarray, np.ndarray]], n_boot: int,
                ci_level: float, seed: int) -> G1Result:
    """Select on ``val``, test on ``test``.

    Args:
        val, test: scores of every ``construction@block`` arm on the two splits.
        constructions: construction names present in the arms.
        mid_blocks: candidate blocks for the "mid-layer" selection (the final block is never among them).
        final_block: index of the last block.
        baseline: baseline name -> (val scores, test scores), e.g. ``{"bright": ..., "dark": ...}``.
        n_boot, ci_level, seed: bootstrap settings (from the locked entry).

    Returns:
        metrics for the record, a per-arm table (val and test AUROC with CI), and the selection made.
    """
    if final_block in mid_blocks:
        raise ValueError(f"final block {final_block} cannot be a mid-layer candidate")
    vmask, tmask = val.valid(), test.valid()
    yv, yt = val.labels[vmask].astype(int), test.labels[tmask].astype(int)
    for name, y in (("validation", yv), ("test", yt)):
        if y.min() == y.max():
            raise ValueError(f"{name} split has only one token class; cannot compute AUROC")
    val_auc = {arm: _auroc(yv, s[vmask]) for arm, s in val.scores.items()}
    candidates = [(c, b) for b in sorted(mid_blocks) for c in constructions]
    best_c, best_b = max(candidates, key=lambda cb: (val_auc[arm_name(*cb)], -cb[1], cb[0]))
    mid_arm, final_arm = arm_name(best_c, best_b), arm_name(best_c, final_block)
    base_val = {k: _auroc(yv, v[0][vmask]) for k, v in baseline.items()}
    base_name = max(sorted(base_val), key=lambda k: base_val[k])

    arms = [mid_arm, final_arm, f"baseline:{base_name}"] + sorted(test.scores)
    stacked = np.stack([test.scores[mid_arm][tmask], test.scores[final_arm][tmask], baseline[base_name][1][tmask]]
                       + [test.scores[a][tmask] for a in sorted(test.scores)])
    boot = clustered_bootstrap_auroc(yt, stacked, test.patients[tmask], n_boot=n_boot, ci_level=ci_level, seed=seed)
    samples = boot.samples
    n_test = {"patients": int(len(np.unique(test.patients[tmask]))), "images": int(len(np.unique(test.images[tmask]))),
              "tokens": int(tmask.sum()), "positive_tokens": int(yt.sum()), "resamples": int(n_boot)}

    def metric(i: int, description: str) -> dict:
        return {"value": boot.auroc[i], "ci": list(boot.ci[i]), "ci_level": ci_level, "ci_method": boot.method,
                "n": n_test, "unit": "AUROC", "description": description}

    def diff(i: int, j: int, description: str) -> dict:
        d = samples[:, i] - samples[:, j]
        return {"value": boot.auroc[i] - boot.auroc[j], "ci": list(percentile_ci(d, ci_level)), "ci_level": ci_level,
                "ci_method": boot.method + " (paired difference)", "n": n_test, "unit": "AUROC difference",
                "description": description}

    metrics = {
        "mid_auroc": metric(0, f"test token AUROC of the validation-selected mid-layer arm {mid_arm}"),
        "final_auroc": metric(1, f"test token AUROC of the same construction at the final block ({final_arm})"),
        "delta_mid_final_auroc": diff(0, 1, f"{mid_arm} minus {final_arm}, paired over patients"),
        "intensity_baseline_auroc": metric(2, f"trivial intensity baseline ({base_name}, sign chosen on validation)"),
        "delta_mid_intensity_auroc": diff(0, 2, f"{mid_arm} minus the intensity baseline ({base_name})"),
        "selected_block": {"value": float(best_b), "ci": None, "ci_method": None,
                           "n": {"patients": int(len(np.unique(val.patients[vmask])))},
                           "unit": "0-based block index", "description": "mid-layer block chosen on validation"},
    }
    table = []
    for k, arm in enumerate(arms[3:], start=3):
        c, _, b = arm.partition("@")
        table.append({"arm": arm, "construction": c, "block": int(b), "val_auroc": val_auc[arm],
                      "test_auroc": boot.auroc[k], "test_ci": list(boot.ci[k])})
    table.append({"arm": f"baseline:{base_name}", "construction": "intensity", "block": None,
                  "val_auroc": base_val[base_name], "test_auroc": boot.auroc[2], "test_ci": list(boot.ci[2])})
    selection = {"mid_arm": mid_arm, "final_arm": final_arm, "val_auroc": val_auc[mid_arm],
                 "baseline": base_name, "baseline_val_auroc": base_val, "candidates": [arm_name(*cb) for cb in candidates],
                 "rule": "max validation AUROC over mid-layer arms; ties -> lower block, then name"}
    return G1Result(metrics=metrics, table=table, selection=selection)


def paired_auroc_metrics(test: SplitScores, *, arms: Mapping[str, str], diffs: Mapping[str, tuple[str, str]],
                         n_boot: int, ci_level: float, seed: int) -> dict[str, dict]:
    """AUROC of several arms and paired differences, from one patient-clustered bootstrap on ``test``.

    Args:
        test: scores of the arms (keys of ``test.scores``) with labels and patients.
        arms: metric name -> arm name, e.g. ``{"auroc_density_lung": "A_gauss@3"}``.
        diffs: metric name -> (arm metric, arm metric), e.g. ``{"delta": ("auroc_density", "auroc_saliency")}``.
        n_boot, ci_level, seed: bootstrap settings.

    Returns:
        metric name -> record metric (value, ci, ci_level, ci_method, n, unit, description).
    """
    mask = test.valid()
    y = test.labels[mask].astype(int)
    if y.min() == y.max():
        raise ValueError("test split has only one token class; cannot compute AUROC")
    names = list(arms)
    boot = clustered_bootstrap_auroc(y, np.stack([test.scores[arms[n]][mask] for n in names]),
                                     test.patients[mask], n_boot=n_boot, ci_level=ci_level, seed=seed)
    n = {"patients": int(len(np.unique(test.patients[mask]))), "images": int(len(np.unique(test.images[mask]))),
         "tokens": int(mask.sum()), "positive_tokens": int(y.sum()), "resamples": int(n_boot)}
    out = {}
    for i, name in enumerate(names):
        out[name] = {"value": boot.auroc[i], "ci": list(boot.ci[i]), "ci_level": ci_level, "ci_method": boot.method,
                     "n": n, "unit": "AUROC", "description": f"test token AUROC of {arms[name]}"}
    for name, (a, b) in diffs.items():
        i, j = names.index(a), names.index(b)
        out[name] = {"value": boot.auroc[i] - boot.auroc[j],
                     "ci": list(percentile_ci(boot.samples[:, i] - boot.samples[:, j], ci_level)), "ci_level": ci_level,
                     "ci_method": boot.method + " (paired difference)", "n": n, "unit": "AUROC difference",
                     "description": f"{arms[a]} minus {arms[b]}, paired over patients"}
    return out
