"""SUMMARY.md and NEGATIVE_RESULT.md: what an auditor reads in a minute, generated from audited records.

Records are separated by evidence tier (:mod:`covtoken.evidence`): only ``real`` records are evidence, and
sample runs and flow checks sit in their own tables, each row marked with its tier. Reruns of one gate, lock
entry and dataset are grouped into one row (the latest run is shown, every run is listed). Per row: a one-line
claim title (the full claim stays in the record and the gate template), the tier, the decision, the
*binding* criterion (the one that decided: the first unmet validity check, else the first unmet criterion,
else the first not established, else - for a pass - the one with the smallest margin) with its observed
bound, point estimate and CI against what was needed, the method's metric beside its best baseline, the lock
entry, dataset and backbone, and whether the thresholds were pre-registered.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from .evidence import TIERS

__all__ = ["render_summary", "render_negative", "binding_criterion", "claim_title", "group_runs", "method_vs_baseline"]

_TIER_HEADINGS = {
    "real": "Evidence (tier `real`)",
    "sample": "Sample runs (tier `sample`: registered small samples; not evidence)",
    "flow-check": "Flow checks (tier `flow-check`: phantoms or unverified weights; not evidence)",
}
_TIER_TAG = {"real": "real", "sample": "sample (not evidence)", "flow-check": "flow-check (not evidence)"}


def _f(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2g}" if x != 0 and abs(x) < 0.01 else f"{x:.3f}"


def _template(gate_id: str) -> Mapping[str, Any]:
    from .lock import LockError, gate_template

    try:
        return gate_template(gate_id)
    except (LockError, OSError, ValueError):
        return {}


def claim_title(record: Mapping[str, Any]) -> str:
    """The gate template's one-line ``title``; else the claim's first clause, cut at 80 characters."""
    title = _template(record["gate_id"]).get("title")
    if isinstance(title, str) and title:
        return title
    first = record["claim"].split(":")[0].split(".")[0].strip()
    return first if len(first) <= 80 else first[:77].rstrip() + "..."


def _margin(c: Mapping[str, Any]) -> float:
    bar = c.get("bar", c["threshold"])
    if c["observed"] is None:
        return float("-inf")
    return c["observed"] - bar if c["comparator"] in (">", ">=") else bar - c["observed"]


def binding_criterion(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """The criterion the decision rests on (see the module docstring)."""
    crits = list(record["criteria"])
    for pick in (lambda c: c.get("role") == "validity" and c["outcome"] != "met",
                 lambda c: c["outcome"] == "not_met",
                 lambda c: c["outcome"] in ("not_established", "not_computable")):
        hit = [c for c in crits if pick(c)]
        if hit:
            return hit[0]
    claims = [c for c in crits if c.get("role") != "validity"] or crits
    return min(claims, key=_margin)


def _binding_cell(record: Mapping[str, Any]) -> str:
    c = binding_criterion(record)
    m = record["metrics"].get(c["metric"], {})
    ci = m.get("ci")
    est = f"{_f(m.get('value'))}" + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else "")
    bar = c.get("bar", c["threshold"])
    how = " incl. min. effect" if c.get("min_effect") and c.get("effect_kind", "superiority") == "superiority" else ""
    word = c["outcome"].replace("_", " ")
    return (f"{c['id']}: {c['judged_on']} {_f(c['observed'])}; needs {c['comparator']} {_f(bar)}{how}: {word} "
            f"(`{c['metric']}` {est})")


def method_vs_baseline(record: Mapping[str, Any]) -> str:
    """The method's metric beside its best baseline, as the gate template's ``summary`` block names them."""
    spec = _template(record["gate_id"]).get("summary") or {}
    metrics = record["metrics"]
    higher = bool(spec.get("higher_is_better", True))
    cells = []
    for comp in spec.get("compare", []):
        meth = metrics.get(comp["method"], {}).get("value")
        bases = [(b, metrics[b]["value"]) for b in comp.get("baselines", [])
                 if b in metrics and metrics[b].get("value") is not None]
        if meth is None or not bases:
            continue
        name, val = (max if higher else min)(bases, key=lambda bv: bv[1])
        better = val > meth if higher else val < meth
        label = f"{comp['label']}: " if comp.get("label") else ""
        cells.append(f"{label}{_f(meth)} vs {name} {_f(val)}" + (" (**baseline better**)" if better else ""))
    return "; ".join(cells) or "-"


def group_runs(records: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Reruns of one gate, lock entry and dataset (id and revision) grouped, each group ordered by run id."""
    groups: dict[tuple, list] = {}
    for r in records:
        ds = r["provenance"]["dataset"]
        groups.setdefault((r["gate_id"], r["lock"]["entry"], ds["id"], ds.get("revision")), []).append(r)
    return [sorted(g, key=lambda r: r["run_id"]) for _, g in sorted(groups.items(), key=lambda kv: kv[0][:3])]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(group: Sequence[Mapping[str, Any]], prereg: Mapping[str, tuple[str, str]],
         marks: Mapping[str, Sequence[str]]) -> str:
    r = group[-1]
    prov = r["provenance"]
    ds, bb = prov["dataset"], prov["backbone"]
    tier = r.get("evidence", "flow-check")
    runs = ", ".join(f"`{x['run_id']}` {x['decision']}" for x in group)
    if len(group) > 1:
        runs = f"{len(group)} runs (latest shown): {runs}"
    status = prereg.get(r["run_id"], ("unavailable", ""))[0] + (" (dirty)" if prov["code"]["dirty"] else "")
    status += "".join(f" ({m})" for x in group for m in marks.get(x["run_id"], ()))
    cells = [r["gate_id"], claim_title(r), _TIER_TAG.get(tier, tier), f"**{r['decision']}**", _binding_cell(r),
             method_vs_baseline(r), r["lock"]["entry"],
             f"{ds['id']} ({sum(ds['n_patients'].values())} patients) · {bb['name']}", runs, status]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _records(report: Any) -> tuple[list[Mapping[str, Any]], dict[str, tuple[str, str]], dict[str, list[str]]]:
    recs = [ra.record for ra in report.records if ra.record is not None]
    prereg = {ra.record["run_id"]: ra.prereg for ra in report.records if ra.record is not None}
    marks = {ra.record["run_id"]: list(getattr(ra, "marks", ())) for ra in report.records if ra.record is not None}
    return recs, prereg, marks


def render_summary(report: Any) -> str:
    """SUMMARY.md for an audit report (deterministic for a given set of records)."""
    recs, prereg, marks = _records(report)
    head = ("| gate | claim (title) | tier | decision | binding criterion: observed; needed (metric [95% CI]) | "
            "method vs best baseline | lock entry | dataset · backbone | runs | thresholds |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = ["# Gate summary", "",
             "Generated by `covtoken audit` from the records in this folder; every decision and every evidence tier "
             "was recomputed from the record's facts, metrics and the locked thresholds. Do not edit by hand.", "",
             "**Only `real` records are evidence for a claim.** A `flow-check` ran on phantoms or with weights that "
             "are not a pinned, digest-verified pretrained checkpoint; a `sample` ran on a registered small sample. "
             "Both check that the flow works and are marked in every row.", "",
             "`binding criterion`: the criterion the decision rests on. `thresholds`: whether the lock entry was "
             "committed at or before the code that produced the run. Reruns of one gate, entry and dataset share a "
             "row. Full claims are in the records and `configs/gates/`.", ""]
    for tier in reversed(TIERS):
        groups = group_runs(r for r in recs if r.get("evidence", "flow-check") == tier)
        lines += [f"## {_TIER_HEADINGS[tier]}", ""]
        if groups:
            lines += [head, *(_row(g, prereg, marks) for g in groups)]
        else:
            lines.append("No real-tier record yet: nothing here is evidence for any claim." if tier == "real"
                         else "None.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_negative(report: Any) -> str:
    """NEGATIVE_RESULT.md: failed gates (claims falsified only by `real` records), and what stays open."""
    recs, _, _ = _records(report)
    lines = ["# Negative results", "",
             "Generated by `covtoken audit`. A failed gate is a result. Only a failed `real` record falsifies its "
             "claim; a failed flow check or sample run says the pipeline produced a failing number on data that "
             "are not evidence, and is listed apart.", ""]
    for tier in reversed(TIERS):
        failed = [r for r in recs if r["decision"] == "fail" and r.get("evidence", "flow-check") == tier]
        heading = {"real": "## Falsified claims (tier `real`)",
                   "sample": "## Failed sample runs (tier `sample`; not evidence)",
                   "flow-check": "## Failed flow checks (tier `flow-check`; not evidence)"}[tier]
        lines += [heading, ""]
        if not failed:
            lines += ["None.", ""]
        for r in sorted(failed, key=lambda r: r["run_id"]):
            what = "Falsified claim" if tier == "real" else f"Claim tested ({_TIER_TAG[tier]})"
            lines += [f"### {r['gate_id']} — {claim_title(r)} — `{r['run_id']}`", "",
                      f"{what}: {r['claim']}", "", f"Lock entry `{r['lock']['entry']}`; binding criterion: "
                      f"{_binding_cell(r)}", ""]
            for c in r["criteria"]:
                if c["outcome"] != "met":
                    lines.append(f"- {c['id']}: {c['judged_on']} {_f(c['observed'])}; needs {c['comparator']} "
                                 f"{_f(c.get('bar', c['threshold']))}: {c['outcome'].replace('_', ' ')}")
            if r.get("notes"):
                lines += ["", "What the run recorded:", *[f"- {n}" for n in r["notes"]]]
            lines.append("")
    missing = list(getattr(report, "missing", ()) or ())
    if missing:
        lines += ["## Runs started without a record", "",
                  "The run ledger lists these runs, but no record exists: killed, failed, or deleted. Their result "
                  "is unknown and must not be read as absent.", ""]
        lines += [f"- {m['gate_id']} `{m['run_id']}` (started {m['time']}): {m['why']}" for m in missing]
        lines.append("")
    open_ = [r for r in recs if r["decision"] == "inconclusive"]
    if open_:
        lines += ["## Inconclusive", ""]
        for r in sorted(open_, key=lambda r: r["run_id"]):
            lines.append(f"- {r['gate_id']} `{r['run_id']}` ({_TIER_TAG.get(r.get('evidence', 'flow-check'))}): "
                         f"{r.get('decision_reason', '')}")
    return "\n".join(lines).rstrip() + "\n"
