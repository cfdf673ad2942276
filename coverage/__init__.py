"""Coverage functionals of token sets (RankMe, coding rate, energy), label-free.

They measure how much of the token distribution a kept subset still spans. G6 uses them as the constraint of
a token pruner and shows that they barely notice small lesions.
"""
from __future__ import annotations

from .functionals import (FUNCTIONALS, RANKME_EPS, coding_rate, energy, evaluate, get_functional, rankme,
                          relative_change)

__all__ = ["FUNCTIONALS", "RANKME_EPS", "coding_rate", "energy", "evaluate", "get_functional", "rankme",
           "relative_change"]
