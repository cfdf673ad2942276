"""Benchmark of covtoken.eval statistics (a CLI, not a pytest test).

    python tests/bench_stats.py            # full sizes (section 12 of the science notes)
    python tests/bench_stats.py --quick    # smaller sizes, a few seconds

(a) 1000-resample patient-clustered, class-stratified, paired bootstrap of token AUROC for two arms on
    1e5 tokens / 500 patients: ``clustered_bootstrap_auroc`` against a loop that materialises every
    resample (np.repeat of the tokens by their patient's draw count) and calls ``roc_auc_score`` per arm.
    The loop runs on a subset of the resamples and is extrapolated (printed as such).
(b) fast DeLong for two models at n = 1e6 against one ``roc_auc_score`` call.

Prints timings, speed ratios and the largest disagreement. Exits 1 when the numbers disagree (never
because of speed): bootstrap samples beyond 1e-10, DeLong AUROCs beyond 1e-9.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from covtoken.eval.bootstrap import clustered_bootstrap_auroc, draw_cluster_counts
from covtoken.eval.delong import delong_paired
from covtoken.eval.rank import WeightedAUROC

BOOT_TOL = 1e-10
DELONG_TOL = 1e-9


def token_data(n_tokens: int, n_patients: int, seed: int):
    """Patients with random sizes and effects; ~half hold lesions; two float32 score arms (some ties)."""
    rng = np.random.default_rng(seed)
    pid = np.sort(rng.integers(0, n_patients, n_tokens))
    lesion = rng.random(n_patients) < 0.5
    y = (lesion[pid] & (rng.random(n_tokens) < 0.2)).astype(np.int64)
    effect = rng.normal(size=n_patients)[pid]
    a = (effect + 1.5 * y + rng.normal(size=n_tokens)).astype(np.float32).astype(np.float64)
    b = (0.5 * effect + 1.2 * y + rng.normal(size=n_tokens)).astype(np.float32).astype(np.float64)
    return y, a, b, pid


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_bootstrap(n_tokens: int, n_patients: int, n_boot: int, n_check: int) -> bool:
    y, a, b, pid = token_data(n_tokens, n_patients, seed=0)
    print(f"(a) clustered paired bootstrap: {n_tokens} tokens, {n_patients} patients, {int(y.sum())} positive "
          f"tokens, 2 arms, B = {n_boot}")
    t_vec, res = best_of(lambda: clustered_bootstrap_auroc(y, [a, b], pid, n_boot=n_boot, seed=0), 2)

    ids, idx = np.unique(pid, return_inverse=True)  # the strata rebuilt here, from the raw labels
    has_pos = np.bincount(idx, weights=y, minlength=ids.size) > 0
    counts = draw_cluster_counts([np.flatnonzero(has_pos), np.flatnonzero(~has_pos)], ids.size, n_boot, 0)
    kernels = [WeightedAUROC(y == 1, s, idx, ids.size) for s in (a, b)]
    t_direct, direct = best_of(lambda: np.column_stack([k.auroc(counts, route="direct") for k in kernels]), 1)
    check = np.linspace(0, n_boot - 1, min(n_check, n_boot)).astype(int)
    t0 = time.perf_counter()
    ref = np.empty((check.size, 2))
    for r, i in enumerate(check):
        rep = counts[i][idx]
        yy = np.repeat(y, rep)
        ref[r] = [roc_auc_score(yy, np.repeat(s, rep)) for s in (a, b)]
    t_loop = (time.perf_counter() - t0) * n_boot / check.size
    err = float(max(np.abs(ref - res.samples[check]).max(), np.abs(direct - res.samples).max()))
    point_err = max(abs(res.auroc[0] - roc_auc_score(y, a)), abs(res.auroc[1] - roc_auc_score(y, b)))
    note = "" if check.size == n_boot else f" (timed {check.size} of {n_boot} resamples, extrapolated)"
    print(f"    vectorised clustered_bootstrap_auroc: {t_vec:8.3f} s  (best of 2)")
    print(f"    forced 'direct' kernel route        : {t_direct:8.3f} s  (AUROC kernels only, no K x K matrix)")
    print(f"    sklearn roc_auc_score loop          : {t_loop:8.3f} s{note}")
    print(f"    speed-up: {t_loop / t_vec:.1f}x (target >= 30x); direct route alone: {t_loop / t_direct:.1f}x")
    print(f"    max |vectorised - sklearn| over {check.size} x 2 resampled AUROCs (and auto vs direct "
          f"route on all {n_boot}): {err:.2e}; "
          f"point estimates: {point_err:.2e}")
    (lo_a, hi_a), (lo_b, hi_b) = res.ci
    print(f"    AUROC {res.auroc[0]:.4f} CI {lo_a:.4f}-{hi_a:.4f} | {res.auroc[1]:.4f} CI {lo_b:.4f}-{hi_b:.4f} | "
          f"diff {res.diff:+.4f} CI {res.diff_ci[0]:+.4f}..{res.diff_ci[1]:+.4f}")
    return err <= BOOT_TOL and point_err <= BOOT_TOL


def bench_delong(n: int) -> bool:
    rng = np.random.default_rng(1)
    y = (rng.random(n) < 0.3).astype(np.int64)
    a = rng.normal(size=n) + 1.0 * y
    b = rng.normal(size=n) + 0.8 * y
    print(f"(b) fast DeLong, two models, n = {n}")
    t_sk = t_dl = np.inf
    for _ in range(5):  # interleaved, so that load from other processes hits both sides alike
        t, auc_a = best_of(lambda: roc_auc_score(y, a), 1)
        t_sk = min(t_sk, t)
        t, res = best_of(lambda: delong_paired(y, a, b), 1)
        t_dl = min(t_dl, t)
    err = max(abs(res.auroc_a - auc_a), abs(res.auroc_b - roc_auc_score(y, b)))
    print(f"    one roc_auc_score call     : {t_sk:8.3f} s  (best of 5, interleaved)")
    print(f"    delong_paired, two models  : {t_dl:8.3f} s  (best of 5, interleaved)")
    print(f"    ratio DeLong / roc_auc_score: {t_dl / t_sk:.2f}x (target <= 1.5x)")
    print(f"    max |AUROC DeLong - sklearn|: {err:.2e}; z = {res.z:.3f}, p = {res.p:.3g}")
    return err <= DELONG_TOL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (1e4 tokens, B = 200, n = 1e5)")
    args = parser.parse_args(argv)
    if args.quick:
        ok_a = bench_bootstrap(10_000, 100, 200, 20)
        ok_b = bench_delong(100_000)
    else:
        ok_a = bench_bootstrap(100_000, 500, 1000, 50)
        ok_b = bench_delong(1_000_000)
    if not (ok_a and ok_b):
        print("FAIL: numbers disagree", file=sys.stderr)
        return 1
    print("OK: all numbers agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
