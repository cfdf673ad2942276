"""Token gates and pruners, label-free: keep sets from scores, hard-concrete gates, the coverage-constrained pruner.

Nothing here sees a mask (``tests/test_label_leak.py`` checks the imports); lesion retention is measured in
``covtoken.eval.lesion_miss``.
"""
from __future__ import annotations

from .hard_concrete import BETA, GAMMA, ZETA, deterministic_gates, prob_nonzero, sample_gates
from .keep import keep_count, token_ranks, topk_keep
from .pruner import PrunerConfig, PrunerResult, fit_pruner

__all__ = ["BETA", "GAMMA", "ZETA", "deterministic_gates", "prob_nonzero", "sample_gates", "keep_count",
           "token_ranks", "topk_keep", "PrunerConfig", "PrunerResult", "fit_pruner"]
