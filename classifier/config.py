"""One JSON config drives the classifier: backbone, head, metadata branch, recipe, classes, TTA, abstain.

The file is validated against ``configs/classifier.schema.json`` (unknown keys are errors, naming the key path) and
frozen into :class:`ClassifierConfig`. The metadata branch's ``feature_schema.json`` is read relative to the config
file. The same document (with the feature schema inlined and the built architecture added) is what a trained
model's ``config.json`` holds, so a service rebuilds everything from it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .feature_schema import FeatureSchema

__all__ = ["ClassifierConfig", "ClassifierConfigError", "CONFIG_SCHEMA_FILE", "CONFIG_DIR", "resolve_config_path"]

CONFIG_SCHEMA_FILE = Path(__file__).resolve().parent.parent / "configs" / "classifier.schema.json"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "classifier"


class ClassifierConfigError(ValueError):
    """A classifier config that fails its schema or names a file that is not there."""


def resolve_config_path(name: str | Path) -> Path:
    """A path as given if it exists, else the file of that name in the kit's ``configs/classifier/``."""
    p = Path(name)
    if p.is_file():
        return p
    q = CONFIG_DIR / p.name
    if q.is_file():
        return q
    raise ClassifierConfigError(f"{name}: no such classifier config (looked in . and {CONFIG_DIR})")


def _validate(doc: Any, source: str) -> None:
    import jsonschema

    schema = json.loads(CONFIG_SCHEMA_FILE.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise ClassifierConfigError(f"{source}: {'/'.join(map(str, e.path)) or '<root>'}: {e.message}")


@dataclass(frozen=True)
class ClassifierConfig:
    """A validated config; ``doc`` is the JSON document, ``feature_schema`` the parsed metadata schema (or None)."""

    doc: Mapping[str, Any]
    feature_schema: FeatureSchema | None
    source: str
    digest: str

    @classmethod
    def load(cls, path: str | Path, *, feature_schema: str | Path | None = None) -> "ClassifierConfig":
        """Read and validate ``path``; ``feature_schema`` replaces the config's own (the full-questionnaire arm)."""
        path = resolve_config_path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ClassifierConfigError(f"{path}: {exc}") from None
        return cls.from_dict(doc, source=str(path), base=path.parent, feature_schema=feature_schema)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str = "<config>", base: Path | None = None,
                  feature_schema: str | Path | None = None) -> "ClassifierConfig":
        doc = copy.deepcopy(dict(doc))
        _validate(doc, source)
        if feature_schema is not None:
            doc["metadata"]["feature_schema"] = str(feature_schema)
        schema = None
        ref = doc["metadata"]["feature_schema"]
        if isinstance(ref, str):
            p = Path(ref)
            if not p.is_absolute():
                # next to the config file; else one of the kit's own schemas (configs/classifier/)
                p = (base or CONFIG_DIR) / p if ((base or CONFIG_DIR) / p).is_file() else CONFIG_DIR / p
            if not p.is_file():
                raise ClassifierConfigError(f"{source}: metadata/feature_schema: {p} does not exist")
            schema = FeatureSchema.load(p)
        names = doc["classes"]["names"]
        if doc["classes"]["other"]["name"] in names:
            raise ClassifierConfigError(f"{source}: classes/other/name {doc['classes']['other']['name']!r} is also "
                                        "in classes/names")
        if doc["top_k"] > len(names) + 1:
            raise ClassifierConfigError(f"{source}: top_k {doc['top_k']} exceeds the {len(names) + 1} classes")
        if "identity" not in doc["tta"]:
            raise ClassifierConfigError(f"{source}: tta must include 'identity' (the headline view)")
        digest = "sha256:" + hashlib.sha256(json.dumps(
            {"doc": doc, "schema": schema.as_dict() if schema else None}, sort_keys=True).encode()).hexdigest()
        return cls(doc, schema, source, digest)

    # convenient views -------------------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """Class names in output order: the listed diagnoses, then ``other``."""
        return [*self.doc["classes"]["names"], self.doc["classes"]["other"]["name"]]

    @property
    def backbone(self) -> Mapping[str, Any]:
        return self.doc["backbone"]

    @property
    def recipe(self) -> Mapping[str, Any]:
        return self.doc["recipe"]

    @property
    def meta_dim(self) -> int:
        return self.feature_schema.width if self.feature_schema else 0

    def with_feature_schema(self, path: str | Path) -> "ClassifierConfig":
        """The same config with another metadata schema (path relative to the kit's classifier configs)."""
        return ClassifierConfig.from_dict(self.doc, source=f"{self.source} (feature schema {path})",
                                          base=Path(self.source).parent if Path(self.source).exists() else None,
                                          feature_schema=path)
