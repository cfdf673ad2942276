"""Evidence tiers, derived from facts, never from flags.

Every gate record carries ``evidence``: one of

* ``flow-check`` - the data are phantoms, or the backbone's weights are not a pinned, digest-verified
  pretrained checkpoint (a random initialisation such as the embedded tiny ViT, unknown or unverified weights).
  It checks that the pipeline runs; it says nothing about real backbones or patients.
* ``sample`` - a registered small sample of a real dataset (e.g. the samples in ``../shared/realdata``) with
  verified weights: real files, too few patients to be evidence.
* ``real`` - everything else. Only ``real`` records are evidence for a claim.

The tier is computed by :func:`tier_of` from a record's own provenance (the backbone and dataset blocks), so
the job that writes a record and the audit that reads it use the same function on the same facts. Which
lock entries a tier may be judged under is fixed here too (:func:`check_entry`): a run whose facts are below
``real`` is never judged under a ``real`` entry, and a run is never judged under an entry that claims less
than it is (a real run goes under ``real``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

__all__ = ["TIERS", "Tier", "EvidenceError", "EvidenceFacts", "derive_tier", "facts_of", "tier_of",
           "entry_tier", "allowed_entry", "check_entry", "weights_verified", "registered_sample", "is_phantom",
           "upper_bound_tier", "default_entry_name", "is_evidence", "audit_evidence",
           "tier_marker", "tier_caption", "registry_spec", "weights_upper_bound", "REGISTRIES"]

Tier = Literal["flow-check", "sample", "real"]
TIERS: tuple[Tier, ...] = ("flow-check", "sample", "real")
_RANK = {t: i for i, t in enumerate(TIERS)}


class EvidenceError(ValueError):
    """A run's evidence tier does not allow the lock entry it was asked to be judged under (a user error: one line,
    exit status 2, raised before any compute)."""

    exit_status = 2


@dataclass(frozen=True)
class EvidenceFacts:
    """The facts a tier is derived from.

    Attributes:
        phantom_data: some of the data are generated phantoms.
        registered_sample: the data are a registered small sample of a real dataset.
        weights_verified: the backbone's weights are a pinned pretrained checkpoint whose file digest matched the
            registry's.
        why: one line per fact that lowered the tier (empty for ``real``).
    """

    phantom_data: bool
    registered_sample: bool
    weights_verified: bool
    why: tuple[str, ...] = ()

    @property
    def tier(self) -> Tier:
        return derive_tier(phantom_data=self.phantom_data, registered_sample=self.registered_sample,
                           weights_verified=self.weights_verified)


def derive_tier(*, phantom_data: bool, registered_sample: bool, weights_verified: bool) -> Tier:
    """The rule: phantoms or unverified weights -> ``flow-check``; a registered sample -> ``sample``; else ``real``."""
    if phantom_data or not weights_verified:
        return "flow-check"
    if registered_sample:
        return "sample"
    return "real"


def is_evidence(tier: str) -> bool:
    """Only ``real`` records are evidence for a claim."""
    return tier == "real"


# ------------------------------------------------------------------------------------------------ dataset facts
def is_phantom(dataset_id: str) -> bool:
    """True for the generated phantoms of the embedded default (``phantom-*``)."""
    from .data.catalog import is_embedded

    return is_embedded(dataset_id)


def _components(dataset: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The datasets a record's dataset block is made of (one, or one per modality for multi-dataset gates)."""
    per = (dataset.get("splits") or {}).get("per_modality") if isinstance(dataset.get("splits"), Mapping) else None
    if isinstance(per, Mapping) and per:
        return [dict(v) for v in per.values() if isinstance(v, Mapping)]
    return [dataset]


def registered_sample(dataset: Mapping[str, Any]) -> bool:
    """Is this dataset (its provenance block) a registered small sample?

    Uses the data package's ``is_registered_sample(provenance)`` (``covtoken.data.identity``: the catalog name
    and content digest of a registered sample) when it exists; otherwise the minimal rule below: a catalog entry
    with a registered sample size, and no more patients than that in total.
    """
    try:
        from .data.identity import is_registered_sample  # type: ignore[import-not-found]
    except ImportError:
        try:
            from .data.catalog import is_registered_sample  # type: ignore[attr-defined,no-redef]
        except ImportError:
            is_registered_sample = _fallback_registered_sample
    return bool(is_registered_sample(dataset))


#: Catalog entries whose small samples are registered (``../shared/realdata``), with the largest number of
#: patients (sampling units) a registered sample of the entry has. BUSI: 60 images, one patient each;
#: LIDC-IDRI: 71 slices of 5 patients; Lung-PET-CT-Dx: 11 slices of one patient.
_SAMPLE_MAX_PATIENTS = {"busi": 60, "lidc-idri": 5, "lidc-idri-xml": 5, "lung-pet-ct-dx": 1}


def _fallback_registered_sample(dataset: Mapping[str, Any]) -> bool:
    limit = _SAMPLE_MAX_PATIENTS.get(str(dataset.get("id")))
    if limit is None:
        return False
    n = dataset.get("n_patients") or {}
    total = sum(int(v) for v in n.values()) if isinstance(n, Mapping) else None
    return total is not None and total <= limit


# ----------------------------------------------------------------------------------------------- backbone facts
#: The registries a record's backbone block can name (``backbone.registry``; absent: the frozen-backbone registry).
REGISTRIES = ("frozen", "classifier")


def registry_spec(name: str, registry: str | None = None) -> Any:
    """The registry entry ``name`` of ``registry`` (``"frozen"``: :mod:`covtoken.backbone.registry`, the default;
    ``"classifier"``: :mod:`covtoken.classifier.backbones`). Both entry types carry the fields the verification
    reads (``name, hub_id, revision, revision_pinned, weights_sha256``).

    Raises:
        KeyError: an unknown registry or name (the message lists the choices).
    """
    registry = registry or "frozen"
    if registry == "frozen":
        from .backbone.registry import get_spec

        return get_spec(str(name))
    if registry == "classifier":
        from .classifier.backbones import get_classifier_spec

        return get_classifier_spec(str(name))
    raise KeyError(f"unknown backbone registry {registry!r}; choose one of: {', '.join(REGISTRIES)}")


def _one_weights_verified(block: Mapping[str, Any]) -> tuple[bool, str]:
    from .backbone.registry import pinned_digest_verified

    name = block.get("name")
    try:
        spec = registry_spec(str(name), block.get("registry"))
    except KeyError as exc:
        return False, f"backbone {name!r} is not in the registry ({str(exc.args[0]) if exc.args else exc})"
    if spec.hub_id != block.get("hub_id"):
        return False, f"backbone {name}: recorded hub id {block.get('hub_id')!r} is not the registry's {spec.hub_id!r}"
    return pinned_digest_verified(spec, origin=str(block.get("weights_origin") or ""),
                                  resolved_revision=block.get("resolved_revision"),
                                  files=dict(block.get("weights_files") or {}))


def weights_verified(backbone: Mapping[str, Any]) -> tuple[bool, str]:
    """Recompute, from a record's backbone block and the registry, whether the weights are pinned and verified.

    Verified means: the registry entry of ``name`` (in the registry the block names, ``registry``: ``frozen`` by
    default, or ``classifier``) pins a revision and a sha256 of its weight file; the weights were fetched from the
    Hub at exactly that revision (or given as a local file) and the recorded digest of the weight file matches the
    registry's (:func:`covtoken.backbone.registry.pinned_digest_verified`). A random initialisation, an unpinned
    revision, a registry entry without a digest, or a local file with other bytes is not verified. The
    ``weights_verified`` flag a record may carry is never trusted; it is recomputed here.

    A claim that compares models (G9: the configured model against a baseline) rests on every one of them: their
    weight facts are listed under ``arms/<arm>/weights`` and each must be verified too (a gain over a randomly
    initialised baseline is no evidence).

    Returns:
        ``(verified, reason)``.
    """
    ok, reason = _one_weights_verified(backbone)
    if not ok:
        return ok, reason
    arms = backbone.get("arms") if isinstance(backbone.get("arms"), Mapping) else {}
    for arm, info in sorted(arms.items()):
        block = info.get("weights") if isinstance(info, Mapping) else None
        if isinstance(block, Mapping):
            arm_ok, arm_reason = _one_weights_verified(block)
            if not arm_ok:
                return False, f"arm {arm}: {arm_reason}"
    return ok, reason


# ----------------------------------------------------------------------------------------------------- the tier
def facts_of(*, backbone: Mapping[str, Any], dataset: Mapping[str, Any]) -> EvidenceFacts:
    """The evidence facts of a run from its backbone and dataset provenance blocks."""
    comps = _components(dataset)
    phantom = any(is_phantom(str(c.get("id", ""))) for c in comps)
    sample = any(registered_sample(c) for c in comps)
    verified, wreason = weights_verified(backbone)
    why = []
    if phantom:
        why.append("the data are generated phantoms")
    if not verified:
        why.append(f"the weights are not a pinned, digest-verified pretrained checkpoint ({wreason})")
    if sample and not phantom:
        why.append("the data are a registered small sample")
    return EvidenceFacts(phantom_data=phantom, registered_sample=sample, weights_verified=verified, why=tuple(why))


def tier_of(record: Mapping[str, Any]) -> Tier:
    """The tier a record's facts allow (the audit compares it with the record's ``evidence``)."""
    prov = record["provenance"]
    return facts_of(backbone=prov["backbone"], dataset=prov["dataset"]).tier


def weights_upper_bound(*, backbone: str, weights: str | None, revision: str | None,
                        registry: str = "frozen") -> tuple[Tier, str]:
    """The highest tier one backbone's weights allow, from the run's options alone (before anything is loaded), and
    why it is ``flow-check`` (empty when the loaded weights may still be verified): an entry without a recorded
    digest, a Hub entry without a pinned revision, or a revision other than the pinned one can never be verified;
    otherwise the loaded bytes decide (:func:`weights_verified`)."""
    spec = registry_spec(backbone, registry)
    if not spec.weights_sha256:
        return "flow-check", f"backbone {backbone}: the registry records no sha256 of its weight file"
    if weights is None and not (spec.revision and spec.revision_pinned):
        return "flow-check", f"backbone {backbone}: the registry pins no revision of {spec.hub_id}"
    if revision is not None and revision != spec.revision:
        return "flow-check", f"backbone {backbone}: --revision {revision} is not the pinned {spec.revision}"
    return "real", ""


def upper_bound_tier(*, datasets: list[str], backbone: str, weights: str | None, revision: str | None,
                     registry: str = "frozen") -> Tier:
    """The highest tier a run can reach, from its options alone (before any data or weights are read).

    Phantom data, or a backbone whose registry entry cannot be verified (no pinned revision and digest, or a
    revision other than the pinned one), make it a ``flow-check`` for certain; otherwise the loaded data and
    weights decide between ``sample`` and ``real``.
    """
    if any(is_phantom(d) for d in datasets):
        return "flow-check"
    return weights_upper_bound(backbone=backbone, weights=weights, revision=revision, registry=registry)[0]


# ------------------------------------------------------------------------------------------------ lock entries
def entry_tier(entry_key: str) -> Tier:
    """The tier a lock entry judges: ``<G>/real`` (and a variant such as ``<G>/real-3d``) -> real, ``<G>/sample``
    (``sample-3d``) -> sample, every other (``embedded``, ``embedded-trained``, ...) -> flow-check."""
    name = entry_key.rpartition("/")[2].partition("-")[0]
    return "real" if name == "real" else "sample" if name == "sample" else "flow-check"


def allowed_entry(tier: str, entry_key: str) -> bool:
    """May a run of ``tier`` be judged under ``entry_key``?

    A ``real`` entry judges only ``real`` runs; a ``sample`` entry judges samples and flow checks on real files; every
    other entry (``embedded``) judges flow checks only. So a run never claims more than its facts, and a real run is
    never judged under the looser protocol of a flow check.
    """
    want = entry_tier(entry_key)
    if want == "sample":
        return tier in ("flow-check", "sample")
    return tier == want


def check_entry(tier: str, entry_key: str, *, why: tuple[str, ...] | list[str] = ()) -> None:
    """Raise :class:`EvidenceError` (one line) when a run of ``tier`` may not be judged under ``entry_key``."""
    if allowed_entry(tier, entry_key):
        return
    gate = entry_key.partition("/")[0]
    because = f" ({'; '.join(why)})" if why else ""
    if _RANK[tier] < _RANK[entry_tier(entry_key)]:
        hint = f"{gate}/sample" if tier == "sample" else f"{gate}/embedded (or {gate}/sample on real files)"
        raise EvidenceError(f"this run is a {tier}{because}; it cannot be judged under {entry_key}, which judges "
                            f"{entry_tier(entry_key)} runs; use --lock-entry {hint}")
    raise EvidenceError(f"this run is {tier} evidence{because}; judge it under {gate}/{tier}, not {entry_key}")


def default_entry_name(upper: Tier, *, phantom: bool, entries: list[str]) -> str:
    """The entry a job uses without ``--lock-entry``: ``embedded`` for phantoms; for a flow check on real files the
    gate's ``sample`` entry when it has one (else ``embedded``); ``real`` when the run can be real evidence."""
    if upper == "real":
        return "real"
    if not phantom and "sample" in entries:
        return "sample"
    return "embedded"


def audit_evidence(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The audit's evidence check of one record: ``[(field, problem), ...]``, empty when it holds.

    The tier is recomputed from the record's facts with :func:`facts_of`; a record whose ``evidence`` differs
    (claims more, or less, than its facts allow) fails, and so does a record judged under an entry its tier may
    not be judged under (a flow check under a ``real`` entry).
    """
    claimed = record.get("evidence")
    if claimed is None:
        return [("evidence", "missing: records carry the evidence tier derived from their facts; regenerate it")]
    prov = record["provenance"]
    facts = facts_of(backbone=prov["backbone"], dataset=prov["dataset"])
    out = []
    if claimed != facts.tier:
        more = "more than" if _RANK.get(claimed, -1) > _RANK[facts.tier] else "other than"
        out.append(("evidence", f"claims {claimed!r}, {more} its facts allow: {facts.tier!r} "
                                f"({'; '.join(facts.why) or 'real data, verified weights'})"))
    entry = record["lock"]["entry"]
    if not allowed_entry(facts.tier, entry):
        out.append(("lock/entry", f"a {facts.tier} run judged under {entry}, which judges {entry_tier(entry)} runs"))
    return out


def tier_marker(tier: str) -> str:
    """The tag a paper puts on every number from a record below ``real`` (empty for ``real``)."""
    return "" if tier == "real" else f"<sup>{tier}</sup>"


def tier_caption(tiers: list[str] | tuple[str, ...]) -> str:
    """The prefix of a figure caption drawn from records of ``tiers`` (the lowest tier speaks)."""
    low = min(tiers, key=lambda t: _RANK.get(t, -1)) if tiers else "flow-check"
    return "" if low == "real" else f"**[{low}: not evidence]** "
