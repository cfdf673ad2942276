"""Probe checkpoints: the published DermaJEPA ``.npz`` format, covtoken's safetensors, and a model card.

DermaJEPA ``.npz`` (read only): ``predictor_kind`` (``["linear"]`` or ``["mlp"]``; checkpoints written before
the MLP existed lack it and are linear), ``feature_dim`` (``[d]``), ``input_embedding_model_id`` (``[id]``),
``model_id`` (``[id]``, optional), and the parameters: ``weight`` (d, d) and ``bias`` (d,) applied as
``z @ weight + bias``; or ``mlp_w1`` (d, h), ``mlp_b1``, ``mlp_w2`` (h, d), ``mlp_b2`` and ``hidden_dim``
for ``z + relu(z @ w1 + b1) @ w2 + b2``. Loading refuses a checkpoint made for another embedding model or
dimension; the error names the field.

covtoken safetensors (read and write): the same parameter tensors (float32) and, as string metadata,
``predictor_kind``, ``feature_dim``, ``input_embedding_model_id``, ``model_id``, ``schema_version``
(:data:`SCHEMA_VERSION`) and free provenance (run id, seed, head).

:func:`render_model_card` writes a Markdown card from a G7 gate record: claim, decision, metrics with CIs,
backbone and data, and the caveats a reader needs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .probe import check_params

__all__ = ["ProbeCheckpoint", "CheckpointError", "load_dermajepa_npz", "save_probe", "load_probe",
           "render_model_card", "probe_bytes", "SCHEMA_VERSION"]

SCHEMA_VERSION = "covtoken.probe/1"
_PARAM_KEYS = {"linear": ("weight", "bias"), "mlp": ("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2")}


class CheckpointError(ValueError):
    """A probe checkpoint is malformed or belongs to another backbone or dimension; names the field."""


@dataclass(frozen=True)
class ProbeCheckpoint:
    """A predictor with the identity of the embeddings it expects.

    Attributes:
        kind: ``"linear"`` or ``"mlp"``.
        feature_dim: d.
        input_embedding_model_id: embedding model the predictor was trained on.
        params: float32 parameter arrays (see :class:`covtoken.arch.probe.TrainedProbe`).
        model_id: the predictor's own name.
        metadata: further string fields (schema version, run id, seed...).
    """

    kind: str
    feature_dim: int
    input_embedding_model_id: str
    params: Mapping[str, np.ndarray]
    model_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


def _norm_id(model_id: str) -> str:
    return model_id.strip().removeprefix("hf-hub:")


def _check_identity(ckpt: ProbeCheckpoint, source: str, expected_model_id: str | None,
                    expected_dim: int | None) -> ProbeCheckpoint:
    if ckpt.kind not in _PARAM_KEYS:
        raise CheckpointError(f"{source}: field predictor_kind: {ckpt.kind!r} is not one of {sorted(_PARAM_KEYS)}")
    try:
        d = check_params(ckpt.kind, ckpt.params)
    except ValueError as exc:
        raise CheckpointError(f"{source}: field {_PARAM_KEYS[ckpt.kind][0]}: {exc}") from None
    if d != ckpt.feature_dim:
        raise CheckpointError(f"{source}: field feature_dim: {ckpt.feature_dim} but the parameters are {d}-dimensional")
    if expected_dim is not None and ckpt.feature_dim != expected_dim:
        raise CheckpointError(f"{source}: field feature_dim: checkpoint is for {ckpt.feature_dim}-dimensional "
                              f"embeddings, the backbone gives {expected_dim}")
    if expected_model_id is not None and _norm_id(ckpt.input_embedding_model_id) != _norm_id(expected_model_id):
        raise CheckpointError(f"{source}: field input_embedding_model_id: checkpoint was trained on "
                              f"{ckpt.input_embedding_model_id!r}, not on {expected_model_id!r}")
    return ckpt


def _scalar(z: Any, key: str, source: str) -> Any:
    if key not in z:
        raise CheckpointError(f"{source}: field {key}: missing (have {sorted(z.keys())})")
    a = np.asarray(z[key])
    if a.size != 1:
        raise CheckpointError(f"{source}: field {key}: expected one value, got shape {a.shape}")
    return a.reshape(-1)[0].item()


def load_dermajepa_npz(path: str | Path, *, expected_model_id: str | None, expected_dim: int | None
                       ) -> ProbeCheckpoint:
    """Load a published DermaJEPA predictor and check it fits the embeddings it will be applied to.

    Args:
        path: the ``.npz`` file.
        expected_model_id: embedding model id of the backbone in use (``hf-hub:`` prefixes are ignored), or
            None to skip the check (inspection only).
        expected_dim: embedding dimension of the backbone in use, or None to skip.

    Raises:
        CheckpointError: missing or malformed fields, or a mismatched backbone or dimension.
    """
    source = str(path)
    with np.load(path, allow_pickle=False) as z:
        kind = str(_scalar(z, "predictor_kind", source)) if "predictor_kind" in z else "linear"
        dim = _scalar(z, "feature_dim", source)
        if not isinstance(dim, int):
            raise CheckpointError(f"{source}: field feature_dim: {dim!r} is not an integer")
        emb = str(_scalar(z, "input_embedding_model_id", source))
        model_id = str(_scalar(z, "model_id", source)) if "model_id" in z else ""
        keys = _PARAM_KEYS.get(kind)
        if keys is None:
            raise CheckpointError(f"{source}: field predictor_kind: {kind!r} is not one of {sorted(_PARAM_KEYS)}")
        missing = [k for k in keys if k not in z]
        if missing:
            raise CheckpointError(f"{source}: field {missing[0]}: missing for a {kind} predictor")
        params = {k: np.asarray(z[k], dtype=np.float32) for k in keys}
    return _check_identity(ProbeCheckpoint(kind, int(dim), emb, params, model_id), source, expected_model_id,
                           expected_dim)


def _metadata(ckpt: ProbeCheckpoint) -> dict[str, str]:
    meta = {str(k): str(v) for k, v in ckpt.metadata.items()}
    meta.update({"predictor_kind": ckpt.kind, "feature_dim": str(ckpt.feature_dim),
                 "input_embedding_model_id": ckpt.input_embedding_model_id, "model_id": ckpt.model_id,
                 "schema_version": SCHEMA_VERSION})
    return meta


def probe_bytes(ckpt: ProbeCheckpoint) -> bytes:
    """``ckpt`` as a safetensors file (parameters + string metadata with :data:`SCHEMA_VERSION`), in memory."""
    from safetensors.numpy import save

    _check_identity(ckpt, "<probe>", None, None)
    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in ckpt.params.items()},
                metadata=_metadata(ckpt))


def save_probe(path: str | Path, ckpt: ProbeCheckpoint) -> Path:
    """Write ``ckpt`` as a safetensors file (see :func:`probe_bytes`); never overwrites."""
    path = Path(path)
    with open(path, "xb") as fh:
        fh.write(probe_bytes(ckpt))
    return path


def load_probe(path: str | Path, *, expected_model_id: str | None, expected_dim: int | None) -> ProbeCheckpoint:
    """Read a covtoken probe safetensors file; same checks as :func:`load_dermajepa_npz` plus the schema."""
    from safetensors import safe_open

    source = str(path)
    with safe_open(source, framework="numpy") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("schema_version", "predictor_kind", "feature_dim", "input_embedding_model_id"):
        if key not in meta:
            raise CheckpointError(f"{source}: field {key}: missing from the safetensors metadata")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise CheckpointError(f"{source}: field schema_version: {meta['schema_version']!r}, this reader knows "
                              f"{SCHEMA_VERSION!r}")
    try:
        dim = int(meta["feature_dim"])
    except ValueError:
        raise CheckpointError(f"{source}: field feature_dim: {meta['feature_dim']!r} is not an integer") from None
    kind = meta["predictor_kind"]
    extra = sorted(set(tensors) - set(_PARAM_KEYS.get(kind, ())))
    if extra:
        raise CheckpointError(f"{source}: field {extra[0]}: unexpected tensor for a {kind} predictor")
    rest = {k: v for k, v in meta.items() if k not in ("predictor_kind", "feature_dim", "input_embedding_model_id",
                                                        "model_id")}
    ckpt = ProbeCheckpoint(kind, dim, meta["input_embedding_model_id"], tensors, meta.get("model_id", ""), rest)
    return _check_identity(ckpt, source, expected_model_id, expected_dim)


def _fmt_metric(m: Mapping[str, Any]) -> str:
    v = "n/a" if m.get("value") is None else f"{m['value']:.4f}"
    ci = "" if m.get("ci") is None else f" [{m['ci'][0]:.4f}, {m['ci'][1]:.4f}]"
    return v + ci


def render_model_card(record: Mapping[str, Any], *, checkpoint: str, selection: Mapping[str, Any] | None = None
                      ) -> str:
    """Markdown model card of a probe from its G7 gate record.

    Args:
        record: the gate record (schema-valid).
        checkpoint: the record's artefact path of the checkpoint the card describes.
        selection: the run's ``selection.json`` artefact (what was chosen on validation), if at hand.

    Returns:
        Markdown text.
    """
    prov = record["provenance"]
    bb, ds = prov["backbone"], prov["dataset"]
    art = next((a for a in record["artefacts"] if a["path"] == checkpoint), None)
    if art is None:
        raise ValueError(f"checkpoint {checkpoint!r} is not an artefact of run {record['run_id']}")
    phantom = str(ds.get("id", "")).startswith("phantom-")
    methods = sorted({m.get("ci_method") or "" for m in record["metrics"].values()} - {""})
    rows = "\n".join(f"| `{k}` | {_fmt_metric(m)} | {m.get('unit', '')} | "
                     f"{methods.index(m['ci_method']) + 1 if m.get('ci_method') else ''} |"
                     for k, m in sorted(record["metrics"].items()))
    notes = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(methods))
    crit = "\n".join(f"- {c['id']}: `{c['metric']}` ({c['judged_on']}) {c['comparator']} {c['threshold']} -> "
                     f"**{c['outcome']}**" for c in record["criteria"])
    caveats = [
        "Research artefact; not a medical device and not validated for any clinical decision.",
        "Possible pretraining-data overlap: the backbone's pretraining corpus may contain images of the evaluation "
        "set (e.g. public dermoscopy archives in DermLIP's Derm1M or BiomedCLIP's PMC-15M); scores may then be "
        "optimistic. Check the overlap before reading the numbers as generalisation.",
        "Changing pairs are two different lesions matched on diagnosis and site: a cross-sectional proxy for real "
        "change over time, which it is not.",
        "Nuisances are synthetic (lighting / geometry / colour families); real acquisition shifts differ.",
        "AUROC is directional (changing = positive) and never flipped; below 0.5 means inverted.",
        "CIs resample lesions (clusters of coupled lesions), not pairs; the probe value is the mean over training "
        "seeds; the seed-sweep CI is t-based and covers optimisation variance only.",
        "The probe head and the strongest baseline were chosen on validation lesions, whose stable pairs carry the "
        "held-out nuisance family: the selection saw that family, the predictor's weights never did.",
    ]
    if phantom:
        caveats.insert(0, "Embedded default: synthetic phantoms and a randomly initialised tiny ViT. These numbers "
                          "check the pipeline; they are not evidence about real backbones or patients.")
    tier = record.get("evidence", "flow-check")
    if tier != "real":
        caveats.insert(0, f"Evidence tier: {tier} (derived from the record's facts). Only real-tier records are "
                          "evidence for the claim.")
    sel = ""
    if selection:
        sel = ("\n## Selected on validation\n\n```json\n" + json.dumps(
            {k: selection[k] for k in ("baseline", "probe_head") if k in selection}, indent=2, sort_keys=True)
            + "\n```\n")
    return (f"# Probe model card: `{record['run_id']}`\n\n"
            f"Generated from the gate record `{record['run_id']}.json`; do not edit by hand.\n\n"
            f"- Checkpoint: `{checkpoint}` (sha256 `{art['sha256']}`)\n"
            f"- Backbone: `{bb['name']}` ({bb.get('hub_id') or 'embedded'} @ {bb.get('revision') or 'seeded'}), "
            f"weights `{bb['weights_digest']}`\n"
            f"- Data: `{ds['id']}` ({ds.get('revision')}), patients per split {ds['n_patients']}\n"
            f"- Code: `{prov['code']['commit']}`{' (dirty)' if prov['code']['dirty'] else ''}\n\n"
            f"## Claim and decision\n\n{record['claim']}\n\nDecision: **{record['decision']}** "
            f"(lock entry `{record['lock']['entry']}`)\n\n{crit}\n\n"
            f"## Metrics (test split)\n\n| metric | value [CI] | unit | CI method |\n|---|---|---|---|\n{rows}\n\n"
            f"CI methods:\n\n{notes}\n{sel}\n"
            "## Caveats\n\n" + "\n".join(f"- {c}" for c in caveats) + "\n")
