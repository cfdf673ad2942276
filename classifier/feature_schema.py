"""The metadata branch's input: a ``feature_schema.json`` that says how a questionnaire becomes a vector.

A schema lists features in order. A ``numeric`` feature becomes two columns, ``(x - center) / scale`` (0 when
missing) and a missing flag; a ``categorical`` feature becomes one column per category plus a missing column.
Values in a feature's ``missing`` list (and ``None``) count as missing. Any other value outside the listed
categories, or a numeric value that is not a finite number, is an error naming the feature, the value and the
row, so a service never silently encodes a typo. A reduced schema is a subset of a full one: every feature it
has, it has with the same definition (:meth:`FeatureSchema.check_subset_of`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Feature", "FeatureSchema", "FeatureSchemaError", "SCHEMA_FILE"]

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "configs" / "feature_schema.schema.json"


class FeatureSchemaError(ValueError):
    """A schema that is malformed, or a metadata value the schema cannot encode."""


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str                      # "numeric" | "categorical"
    categories: tuple[str, ...] = ()
    center: float = 0.0
    scale: float = 1.0
    missing: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return 2 if self.kind == "numeric" else len(self.categories) + 1

    def as_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "missing": list(self.missing)}
        if self.kind == "numeric":
            d.update(center=self.center, scale=self.scale)
        else:
            d["categories"] = list(self.categories)
        return d

    def _is_missing(self, v: Any) -> bool:
        if v is None:
            return True
        if isinstance(v, float) and math.isnan(v):
            return True
        return isinstance(v, str) and v.strip().lower() in self.missing

    def encode(self, v: Any, where: str) -> list[float]:
        if self._is_missing(v):
            return [0.0, 1.0] if self.kind == "numeric" else [0.0] * len(self.categories) + [1.0]
        if self.kind == "numeric":
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise FeatureSchemaError(f"{where}: feature {self.name!r}: {v!r} is not a number") from None
            if not math.isfinite(x):
                raise FeatureSchemaError(f"{where}: feature {self.name!r}: {v!r} is not finite")
            return [(x - self.center) / self.scale, 0.0]
        key = str(v).strip().lower()
        if key not in self.categories:
            raise FeatureSchemaError(f"{where}: feature {self.name!r}: unknown category {v!r}; "
                                     f"expected one of {list(self.categories)} or missing {list(self.missing)}")
        return [float(c == key) for c in self.categories] + [0.0]


@dataclass(frozen=True)
class FeatureSchema:
    """An ordered list of features; ``encode`` turns metadata rows into a ``(n, width)`` float32 matrix."""

    name: str
    features: tuple[Feature, ...]

    @property
    def width(self) -> int:
        return sum(f.width for f in self.features)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "<feature schema>") -> "FeatureSchema":
        """Validate ``doc`` against ``configs/feature_schema.schema.json`` and build the schema."""
        import jsonschema

        schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise FeatureSchemaError(f"{source}: {'/'.join(map(str, e.path)) or '<root>'}: {e.message}")
        feats = []
        for i, f in enumerate(doc["features"]):
            missing = tuple(str(m).strip().lower() for m in f.get("missing", []))
            if f["kind"] == "numeric":
                feats.append(Feature(f["name"], "numeric", center=float(f["center"]), scale=float(f["scale"]),
                                     missing=missing))
            else:
                cats = tuple(str(c).strip().lower() for c in f["categories"])
                if len(set(cats)) != len(cats) or set(cats) & set(missing):
                    raise FeatureSchemaError(f"{source}: features/{i}: duplicate categories or a category also "
                                             f"listed as missing in {f['name']!r}")
                feats.append(Feature(f["name"], "categorical", categories=cats, missing=missing))
        names = [f.name for f in feats]
        if len(set(names)) != len(names):
            raise FeatureSchemaError(f"{source}: duplicate feature names in {names}")
        return cls(str(doc["name"]), tuple(feats))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSchema":
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FeatureSchemaError(f"{path}: {exc}") from None
        return cls.from_dict(doc, source=str(path))

    def as_dict(self) -> dict:
        return {"name": self.name, "features": [f.as_dict() for f in self.features]}

    def check_subset_of(self, full: "FeatureSchema") -> None:
        """Raise unless every feature of this (reduced) schema is in ``full`` with the same definition."""
        by_name = {f.name: f for f in full.features}
        for f in self.features:
            if f.name not in by_name:
                raise FeatureSchemaError(f"reduced schema {self.name!r}: feature {f.name!r} is not in {full.name!r}")
            if by_name[f.name] != f:
                raise FeatureSchemaError(f"reduced schema {self.name!r}: feature {f.name!r} is defined differently "
                                         f"in {full.name!r}")

    def encode(self, rows: Sequence[Mapping[str, Any]], *, ids: Sequence[str] | None = None) -> np.ndarray:
        """``(n, width)`` float32; a row lacking a feature's key counts it as missing."""
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        for i, row in enumerate(rows):
            where = f"row {ids[i] if ids is not None else i}"
            out[i] = [x for f in self.features for x in f.encode(row.get(f.name), where)]
        return out
