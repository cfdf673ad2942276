"""Locked thresholds: the file every gate decision is judged under, and the one rule that judges.

``configs/thresholds.lock.json`` holds, per gate, the claim and one entry per setting (``embedded`` for the
synthetic default, ``real`` for real data and backbones). An entry has the criteria (metric, comparator,
threshold, judged on a point estimate or a CI bound), the fixed parameters of the protocol, and how its
thresholds were calibrated (which split, which command). Each entry carries a digest, and the file carries a
digest of everything: a job refuses to judge under a lock whose digests do not match its content, and a
record names the entry and the entry digest it was judged under, so adding a gate later does not invalidate
older records while any edit of an entry they used does.

Decision rule (the same code for the job and the audit):
  * a criterion is ``met`` when its observed value (point estimate or CI bound) satisfies the comparator;
  * judged on a CI bound, it is ``not_established`` when the bound fails but the point estimate satisfies
    the comparator (the data are compatible with the claim but do not establish it);
  * otherwise ``not_met``; ``not_computable`` when the value is missing;
  * decision ``fail`` if any criterion is ``not_met``, else ``inconclusive`` if any is ``not_established``
    or ``not_computable``, else ``pass``.

Pre-registered effects (optional criterion fields, part of the locked entry and its digest):
  * ``min_effect`` with ``min_effect_reason``: the smallest effect worth reporting, in the metric's units. For a
    superiority criterion (``effect_kind`` absent or ``"superiority"``) the value judged must clear the *bar*
    ``threshold + min_effect`` (``>``, ``>=``) or ``threshold - min_effect`` (``<``, ``<=``), so a CI that merely
    excludes the null with a negligible effect is not a pass. For ``effect_kind: "non_inferiority"`` the
    threshold is the margin itself (``threshold == -min_effect`` for ``>``/``>=``) and the bar is the threshold.
  * ``role: "validity"``: a check that the measurement can decide anything (e.g. a proxy task that a trivial
    baseline already solves). A validity criterion that is not met makes the decision ``inconclusive``
    whatever the other criteria say; the record says so in its reason.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .record import loads_strict, write_json_atomic

__all__ = [
    "LockError",
    "ThresholdLock",
    "judge",
    "criterion_outcome",
    "entry_digest",
    "file_digest",
    "canonical_json",
    "DEFAULT_LOCK_PATH",
    "DECISION_RULE",
    "propose_thresholds",
    "lock_entry",
    "write_lock",
    "gate_template",
    "gate_template_entry",
    "criterion_bar",
    "criterion_signature",
    "decision_reason",
    "carry_thresholds",
]

DEFAULT_LOCK_PATH = Path("configs/thresholds.lock.json")
LOCK_VERSION = 1
DECISION_RULE = (
    "inconclusive if any validity criterion is not met (the measurement cannot decide); else fail if any criterion "
    "is not_met; else inconclusive if any is not_established or not_computable; else pass. "
    "A criterion judged on a CI bound whose bound fails while its point estimate passes is not_established. "
    "A criterion with a pre-registered minimum effect is judged against its bar: the threshold moved by the minimum "
    "effect against the claim (superiority), or the threshold itself when it is the non-inferiority margin."
)
_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_CRITERION_KEYS = {"id", "metric", "comparator", "threshold", "judged_on", "calibration_rule", "min_effect",
                   "min_effect_reason", "effect_kind", "role"}


class LockError(ValueError):
    """The lock file is malformed, tampered with, or lacks the entry asked for."""


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact, strict JSON: the byte string digests are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def entry_digest(gate_id: str, claim: str, entry_name: str, entry: Mapping[str, Any]) -> str:
    """Digest of one entry (its content without its own digest), bound to the gate id, claim and name."""
    body = {k: v for k, v in entry.items() if k != "digest"}
    return _sha(canonical_json({"gate": gate_id, "claim": claim, "entry": entry_name, "content": body}))


def file_digest(doc: Mapping[str, Any]) -> str:
    """Digest of the whole lock document without its top-level digest."""
    return _sha(canonical_json({k: v for k, v in doc.items() if k != "digest"}))


def _check_criteria(criteria: Any, where: str) -> None:
    if not isinstance(criteria, list) or not criteria:
        raise LockError(f"{where}/criteria: must be a non-empty list")
    seen = set()
    for i, c in enumerate(criteria):
        w = f"{where}/criteria/{i}"
        if not isinstance(c, dict):
            raise LockError(f"{w}: must be an object")
        missing = {"id", "metric", "comparator", "threshold", "judged_on"} - c.keys()
        if missing:
            raise LockError(f"{w}: missing {sorted(missing)}")
        extra = c.keys() - _CRITERION_KEYS
        if extra:
            raise LockError(f"{w}: unknown keys {sorted(extra)}")
        if c["comparator"] not in _COMPARATORS:
            raise LockError(f"{w}/comparator: {c['comparator']!r} not one of {sorted(_COMPARATORS)}")
        if c["judged_on"] not in ("point", "ci_low", "ci_high"):
            raise LockError(f"{w}/judged_on: {c['judged_on']!r} not one of point, ci_low, ci_high")
        thr = c["threshold"]
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr):
            raise LockError(f"{w}/threshold: {thr!r} is not a finite number")
        _check_effect(c, w)
        if c["id"] in seen:
            raise LockError(f"{w}/id: duplicate criterion id {c['id']!r}")
        seen.add(c["id"])


def _check_effect(c: Mapping[str, Any], w: str) -> None:
    """The optional effect fields of one criterion: a minimum effect with its reason, its kind, the role."""
    if c.get("role", "claim") not in ("claim", "validity"):
        raise LockError(f"{w}/role: {c['role']!r} not one of claim, validity")
    kind = c.get("effect_kind", "superiority")
    if kind not in ("superiority", "non_inferiority"):
        raise LockError(f"{w}/effect_kind: {kind!r} not one of superiority, non_inferiority")
    if "min_effect" not in c:
        if "min_effect_reason" in c or "effect_kind" in c:
            raise LockError(f"{w}/min_effect: missing (min_effect_reason and effect_kind describe a minimum effect)")
        return
    eff = c["min_effect"]
    if isinstance(eff, bool) or not isinstance(eff, (int, float)) or not math.isfinite(eff) or eff < 0:
        raise LockError(f"{w}/min_effect: {eff!r} is not a finite number >= 0")
    if not isinstance(c.get("min_effect_reason"), str) or len(c["min_effect_reason"].strip()) < 10:
        raise LockError(f"{w}/min_effect_reason: a minimum effect needs its reason (a sentence)")
    if kind == "non_inferiority":
        margin = -eff if c["comparator"] in (">", ">=") else eff
        if not math.isclose(c["threshold"], margin, abs_tol=1e-12):
            raise LockError(f"{w}/threshold: a non-inferiority criterion's threshold is its margin {margin}, "
                            f"got {c['threshold']}")


def criterion_bar(criterion: Mapping[str, Any]) -> float:
    """The value a criterion's observed value is compared with: the threshold moved by a superiority minimum effect
    against the claim (``> 0`` with minimum effect 0.02 -> ``> 0.02``); the threshold otherwise."""
    thr = float(criterion["threshold"])
    eff = float(criterion.get("min_effect", 0.0))
    if criterion.get("effect_kind", "superiority") != "superiority" or not eff:
        return thr
    return thr + eff if criterion["comparator"] in (">", ">=") else thr - eff


def criterion_signature(c: Mapping[str, Any]) -> tuple:
    """What a record's criterion must share with the locked one (the audit compares these)."""
    return (c["id"], c["metric"], c["comparator"], c["threshold"], c["judged_on"], c.get("min_effect"),
            c.get("effect_kind", "superiority") if "min_effect" in c else None, c.get("role", "claim"))


@dataclass(frozen=True)
class LockedEntry:
    """One gate entry as a job or the audit uses it."""

    gate_id: str
    name: str
    claim: str
    criteria: tuple[dict, ...]
    parameters: Mapping[str, Any]
    calibration: Mapping[str, Any]
    digest: str

    @property
    def key(self) -> str:
        return f"{self.gate_id}/{self.name}"


class ThresholdLock:
    """A verified threshold lock document.

    Construction verifies every entry digest and the file digest; any mismatch raises :class:`LockError`
    naming the entry, so nothing is judged under a lock that was edited by hand.
    """

    def __init__(self, doc: Mapping[str, Any], *, source: str = "<lock>") -> None:
        self.source = source
        self.doc = copy.deepcopy(dict(doc))
        if self.doc.get("lock_version") != LOCK_VERSION:
            raise LockError(f"{source}: field lock_version: expected {LOCK_VERSION}, got {self.doc.get('lock_version')!r}")
        gates = self.doc.get("gates")
        if not isinstance(gates, dict):
            raise LockError(f"{source}: field gates: must be an object")
        for gid, gate in gates.items():
            if not isinstance(gate, dict) or not isinstance(gate.get("claim"), str) or not gate["claim"]:
                raise LockError(f"{source}: field gates/{gid}/claim: missing")
            entries = gate.get("entries")
            if not isinstance(entries, dict) or not entries:
                raise LockError(f"{source}: field gates/{gid}/entries: must be a non-empty object")
            for name, entry in entries.items():
                where = f"{source}: field gates/{gid}/entries/{name}"
                _check_criteria(entry.get("criteria"), where)
                want = entry_digest(gid, gate["claim"], name, entry)
                if entry.get("digest") != want:
                    raise LockError(f"{where}/digest: recorded {entry.get('digest')!r} does not match the content "
                                    f"({want}); the entry was edited after it was locked")
        want = file_digest(self.doc)
        if self.doc.get("digest") != want:
            raise LockError(f"{source}: field digest: recorded {self.doc.get('digest')!r} does not match the file "
                            f"content ({want})")

    @classmethod
    def load(cls, path: str | Path = DEFAULT_LOCK_PATH) -> "ThresholdLock":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LockError(f"{path}: threshold lock is missing") from None
        return cls(loads_strict(text, source=str(path)), source=str(path))

    @property
    def digest(self) -> str:
        return self.doc["digest"]

    def gate_ids(self) -> list[str]:
        return sorted(self.doc["gates"])

    def entry(self, key: str) -> LockedEntry:
        """The entry ``"<gate>/<name>"``, e.g. ``"G1/embedded"``."""
        gid, _, name = key.partition("/")
        gate = self.doc["gates"].get(gid)
        if gate is None:
            raise LockError(f"{self.source}: no gate {gid!r}; have {self.gate_ids()}")
        entry = gate["entries"].get(name)
        if entry is None:
            raise LockError(f"{self.source}: gate {gid} has no entry {name!r}; have {sorted(gate['entries'])}")
        return LockedEntry(gid, name, gate["claim"], tuple(copy.deepcopy(entry["criteria"])),
                           copy.deepcopy(entry.get("parameters", {})), copy.deepcopy(entry.get("calibration", {})),
                           entry["digest"])

    def record_stamp(self, key: str, path: str | Path) -> dict:
        """The ``lock`` block of a record judged under entry ``key``."""
        e = self.entry(key)
        return {"path": Path(path).as_posix(), "entry": e.key, "entry_digest": e.digest, "file_digest": self.digest}


def criterion_outcome(criterion: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]]) -> dict:
    """Judge one locked criterion against the metrics; returns the record's criterion entry."""
    m = metrics.get(criterion["metric"])
    point = None if m is None else m.get("value")
    if criterion["judged_on"] == "point":
        observed = point
    else:
        ci = None if m is None else m.get("ci")
        observed = None if ci is None else ci[0 if criterion["judged_on"] == "ci_low" else 1]
    cmp = _COMPARATORS[criterion["comparator"]]
    bar = criterion_bar(criterion)
    if observed is None:
        outcome = "not_computable"
    elif cmp(observed, bar):
        outcome = "met"
    elif criterion["judged_on"] != "point" and point is not None and cmp(point, bar):
        outcome = "not_established"
    else:
        outcome = "not_met"
    out = {
        "id": criterion["id"],
        "metric": criterion["metric"],
        "comparator": criterion["comparator"],
        "threshold": criterion["threshold"],
        "judged_on": criterion["judged_on"],
        "observed": observed,
        "point": point,
        "outcome": outcome,
    }
    if "min_effect" in criterion:
        out.update(min_effect=criterion["min_effect"], effect_kind=criterion.get("effect_kind", "superiority"),
                   bar=bar)
    if criterion.get("role", "claim") != "claim":
        out["role"] = criterion["role"]
    return out


def judge(criteria: tuple[dict, ...] | list[dict], metrics: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[dict], str]:
    """Apply the decision rule.

    Returns:
        ``(decision, judged_criteria, reason)``.
    """
    judged = [criterion_outcome(c, metrics) for c in criteria]
    outcomes = [c["outcome"] for c in judged]
    invalid = any(c.get("role") == "validity" and c["outcome"] != "met" for c in judged)
    if invalid:
        decision = "inconclusive"
    elif "not_met" in outcomes:
        decision = "fail"
    elif "not_established" in outcomes or "not_computable" in outcomes:
        decision = "inconclusive"
    else:
        decision = "pass"
    return decision, judged, decision_reason(judged)


_OUTCOME_WORDS = {"met": "met", "not_met": "not met", "not_established": "not established",
                  "not_computable": "not computable"}


def decision_reason(judged: list[dict]) -> str:
    """The one-line reason of a decision, read left to right as what was observed and what was needed.

    E.g. ``C1_recall_noninferior: ci_low -0.316; needs > -0.100: not met | C2_...: point 1.25; needs >= 1.000: met``.
    Validity criteria come first; a minimum effect shows how the bar was set. The job writes it and the audit
    recomputes it with this function.
    """
    parts = []
    for c in sorted(judged, key=lambda c: c.get("role") != "validity"):
        bar = c.get("bar", c["threshold"])
        how = ""
        if "min_effect" in c and c.get("effect_kind", "superiority") == "superiority" and c["min_effect"]:
            how = f" (null {_fmt(c['threshold'])} + minimum effect {_fmt(c['min_effect'])})"
        elif c.get("effect_kind") == "non_inferiority":
            how = f" (non-inferiority margin {_fmt(c['min_effect'])})"
        tail = ""
        if c["outcome"] == "not_established" and c["point"] is not None:
            tail = f" (point {_fmt(c['point'])} meets it)"
        role = "validity " if c.get("role") == "validity" else ""
        word = _OUTCOME_WORDS[c["outcome"]]
        if c.get("role") == "validity" and c["outcome"] != "met":
            word += ": the measurement cannot decide, so the decision is inconclusive"
        parts.append(f"{role}{c['id']}: {c['judged_on']} {_fmt(c['observed'])}; needs {c['comparator']} "
                     f"{_fmt(bar)}{how}: {word}{tail}")
    return " | ".join(parts)


def _fmt(x: float | None) -> str:
    """Three decimals; small non-zero values keep two significant digits so a comparison never reads as equality."""
    if x is None:
        return "n/a"
    if x != 0 and abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.3f}"


# --------------------------------------------------------------------------------------------------- calibration
def propose_thresholds(criteria: list[dict], calibration_metrics: list[Mapping[str, Mapping[str, Any]]]) -> list[dict]:
    """Propose thresholds from calibration-split metrics.

    Criteria with ``calibration_rule: "fixed"`` keep their threshold (it is part of the claim, e.g. "> 0").
    ``"floor_ci_low"`` (for ``>``/``>=``) proposes the smallest CI lower bound over the calibration runs,
    floored to 0.01; ``"ceil_ci_high"`` (for ``<``/``<=``) the largest upper bound, ceiled to 0.01.

    Returns:
        the criteria with proposed thresholds and a ``proposal`` note each (the caller locks them).
    """
    if not calibration_metrics:
        raise LockError("no calibration results given; thresholds are never proposed from nothing")
    out = []
    for c in criteria:
        rule = c.get("calibration_rule", "fixed")
        new = dict(c)
        if rule == "fixed":
            pass
        elif rule in ("floor_ci_low", "ceil_ci_high"):
            vals = []
            for i, metrics in enumerate(calibration_metrics):
                m = metrics.get(c["metric"])
                if m is None or m.get("ci") is None:
                    raise LockError(f"calibration result {i}: metric {c['metric']!r} with a CI is missing")
                vals.append(m["ci"][0] if rule == "floor_ci_low" else m["ci"][1])
            new["threshold"] = (math.floor(min(vals) * 100) / 100 if rule == "floor_ci_low"
                                else math.ceil(max(vals) * 100) / 100)
        else:
            raise LockError(f"criterion {c.get('id')!r}: unknown calibration_rule {rule!r}")
        out.append(new)
    return out


def carry_thresholds(criteria: list[dict], locked: LockedEntry) -> list[dict]:
    """Criteria of a superseding entry whose calibrated thresholds are carried over from the entry it replaces.

    For a change of protocol parameters or effect fields that leaves the thresholds alone (nothing is
    re-estimated, so nothing can be tuned on a judged number): each criterion whose ``calibration_rule`` is not
    ``fixed`` takes the threshold locked under the same id, metric, comparator and bound; a new calibrated
    criterion cannot be carried and raises.
    """
    old = {c["id"]: c for c in locked.criteria}
    out = []
    for c in criteria:
        new = dict(c)
        if c.get("calibration_rule", "fixed") != "fixed":
            prev = old.get(c["id"])
            if prev is None or (prev["metric"], prev["comparator"], prev["judged_on"]) != (
                    c["metric"], c["comparator"], c["judged_on"]):
                raise LockError(f"{locked.key}: criterion {c['id']!r} has no locked counterpart with the same metric, "
                                "comparator and bound; it needs calibration results")
            new["threshold"] = prev["threshold"]
        out.append(new)
    return out


def lock_entry(doc: dict, *, gate_id: str, claim: str, name: str, criteria: list[dict], parameters: Mapping[str, Any],
               calibration: Mapping[str, Any], supersede: bool = False) -> dict:
    """Return a new lock document with entry ``gate_id/name`` frozen (digests recomputed).

    An existing entry is replaced only with ``supersede=True``; the replaced digest is kept under
    ``supersedes`` so the history of a threshold stays visible.
    """
    new = copy.deepcopy(doc) if doc else {"lock_version": LOCK_VERSION, "decision_rule": DECISION_RULE, "gates": {}}
    new["decision_rule"] = DECISION_RULE  # the rule the code applies, stated in the file it judges under
    gate = new["gates"].setdefault(gate_id, {"claim": claim, "entries": {}})
    if gate["claim"] != claim:
        raise LockError(f"gate {gate_id}: claim differs from the locked claim; a changed claim is a new gate")
    old = gate["entries"].get(name)
    if old is not None and not supersede:
        raise LockError(f"gate {gate_id} entry {name!r} is already locked (digest {old['digest']}); "
                        "pass --supersede to replace it, which keeps the old digest on record")
    entry: dict[str, Any] = {"criteria": criteria, "parameters": dict(parameters), "calibration": dict(calibration)}
    if old is not None:
        entry["supersedes"] = old.get("supersedes", []) + [old["digest"]]
    _check_criteria(criteria, f"gates/{gate_id}/entries/{name}")
    entry["digest"] = entry_digest(gate_id, claim, name, entry)
    gate["entries"][name] = entry
    new["digest"] = file_digest(new)
    ThresholdLock(new)  # verify the result before anyone writes it
    return new


def write_lock(doc: dict, path: str | Path) -> Path:
    """Write a verified lock document (replacing the previous file atomically)."""
    ThresholdLock(doc, source=str(path))
    return write_json_atomic(path, doc, overwrite=True)


# --------------------------------------------------------------------------------------------------- templates
def gate_template(gate_id: str, *, root: str | Path | None = None) -> dict:
    """The gate template ``configs/gates/<gate_id>.json``: claim, entries, criteria with calibration rules."""
    if root is None:
        from importlib import resources

        base = Path(str(resources.files("covtoken").joinpath("configs/gates")))
        local = Path("configs/gates")
        root = local if (local / f"{gate_id}.json").is_file() else base
    path = Path(root) / f"{gate_id}.json"
    try:
        doc = loads_strict(path.read_text(encoding="utf-8"), source=str(path))
    except FileNotFoundError:
        raise LockError(f"{path}: no template for gate {gate_id}") from None
    if doc.get("gate_id") != gate_id:
        raise LockError(f"{path}: field gate_id: {doc.get('gate_id')!r} is not {gate_id!r}")
    for name, entry in doc.get("entries", {}).items():
        _check_criteria(entry.get("criteria"), f"{path}: field entries/{name}")
    return doc


def gate_template_entry(key: str, *, root: str | Path | None = None) -> dict:
    """One entry (``"G1/embedded"``) of a gate template."""
    gid, _, name = key.partition("/")
    doc = gate_template(gid, root=root)
    try:
        return doc["entries"][name]
    except KeyError:
        raise LockError(f"gate template {gid} has no entry {name!r}; have {sorted(doc.get('entries', {}))}") from None
