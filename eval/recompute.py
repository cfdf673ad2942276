"""Named metric recipes: the one path from stored evaluation inputs to a record's metrics.

A gate job never computes its record metrics directly. It hands a recipe name, the evaluation arrays
(scores, labels, patient/cluster ids...) and the recipe arguments (bootstrap seed, resamples, CI level...)
to :func:`evaluate`, which runs the registered recipe and returns the metrics. The runner stores the same
arrays as an eval-only artefact (``eval_inputs-<k>.npz``) and the call (recipe, arguments, metric names) in
``evaluation.json``; the audit loads both and calls :func:`evaluate` again. Every metric of the record must
come out of one recipe call, and come out the same (:func:`compare_metrics`).

Recipes are pure functions ``(arrays, args) -> Evaluation``: no I/O, no global state, deterministic for a
given input (every random draw is seeded from ``args``). A new gate adds one recipe here (or registers one
with :func:`recipe` from its eval module) and calls it through :meth:`covtoken.runner.Run.evaluate`.

Tolerance: the audit compares recomputed with recorded values exactly for strings, integers, booleans and
nulls, and floats to an absolute :data:`FLOAT_TOLERANCE` (1e-12); on the machine that made the record the
recomputation is bit-identical, the tolerance only absorbs last-bit differences of vectorised reductions on
another CPU. Any edit of a metric a human could notice is far above it.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["Evaluation", "RecipeError", "recipe", "recipes", "evaluate", "pack_arrays", "unpack_arrays",
           "compare_metrics", "FLOAT_TOLERANCE", "canonical"]

FLOAT_TOLERANCE = 1e-12


class RecipeError(ValueError):
    """Unknown recipe, or inputs/arguments a recipe cannot use."""


@dataclass(frozen=True)
class Evaluation:
    """What a recipe returns.

    Attributes:
        metrics: record metrics (name -> value, ci, ci_level, ci_method, n, unit, description).
        extras: JSON-able side products the job writes as artefacts (per-arm tables, selections); the audit
            does not compare them.
    """

    metrics: dict
    extras: dict = field(default_factory=dict)


Recipe = Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], Evaluation]
_RECIPES: dict[str, Recipe] = {}


def recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Register ``fn`` as the recipe ``name`` (names are unique and never reused for other maths)."""

    def deco(fn: Recipe) -> Recipe:
        if name in _RECIPES and _RECIPES[name] is not fn:
            raise RecipeError(f"recipe {name!r} is registered twice")
        _RECIPES[name] = fn
        return fn

    return deco


def recipes() -> dict[str, Recipe]:
    """Every registered recipe (importing the gate recipes first)."""
    from . import recipes as _gate_recipes  # noqa: F401  (registers the gate recipes)

    return dict(_RECIPES)


def canonical(obj: Any) -> Any:
    """``obj`` as the record stores it (a strict JSON round trip: tuples become lists, numpy scalars numbers)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON-serialisable: {type(o).__name__}")

    return json.loads(json.dumps(obj, allow_nan=False, default=default, sort_keys=True))


def evaluate(name: str, arrays: Mapping[str, np.ndarray], args: Mapping[str, Any]) -> Evaluation:
    """Run recipe ``name`` on ``arrays`` with ``args``; metrics and extras come back canonical (JSON-exact)."""
    table = recipes()
    if name not in table:
        raise RecipeError(f"unknown metric recipe {name!r}; known: {sorted(table)}")
    arrs = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrs.items():
        if v.dtype == object:
            raise RecipeError(f"recipe {name}: array {k!r} has dtype object; store numbers or fixed-width strings")
    ev = table[name](arrs, canonical(dict(args)))
    return Evaluation(metrics=canonical(ev.metrics), extras=canonical(ev.extras))


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The ``.npz`` bytes of ``arrays`` (compressed, no pickles)."""
    buf = io.BytesIO()
    clean = {}
    for k, v in arrays.items():
        if "/" in k or k.startswith("."):
            raise RecipeError(f"array name {k!r} must not contain '/' or start with '.'")
        a = np.asarray(v)
        if a.dtype == object:
            raise RecipeError(f"array {k!r} has dtype object; store numbers or fixed-width strings")
        clean[k] = a
    np.savez_compressed(buf, **clean)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` written by :func:`pack_arrays` (pickles refused)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _same(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str) or isinstance(b, str):
        if a != b or type(a) is not type(b):
            out.append(f"{path}: recorded {b!r}, recomputed {a!r}")
        return
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > FLOAT_TOLERANCE:
            out.append(f"{path}: recorded {b!r}, recomputed {a!r}")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{path}/{k}: recorded but not produced by the recipe")
            elif k not in b:
                out.append(f"{path}/{k}: produced by the recipe but missing from the record")
            else:
                _same(a[k], b[k], f"{path}/{k}", out)
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: recorded {len(b)} entries, recomputed {len(a)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}/{i}", out)
        return
    out.append(f"{path}: recorded {b!r}, recomputed {a!r}")


def compare_metrics(recomputed: Mapping[str, Any], recorded: Mapping[str, Any], *, prefix: str = "metrics") -> list[str]:
    """Differences between recomputed and recorded metric dicts, one line each (empty: identical)."""
    out: list[str] = []
    _same(canonical(dict(recomputed)), canonical(dict(recorded)), prefix, out)
    return out
