"""CI reproduces every committed embedded record at HEAD: code drift or a commit swap fails here.

Each committed ``Gx/embedded`` record in gate_reports/ (samples excluded) is compared with the same gate's
``--smoke`` job run at HEAD under the repository's lock: first the protocol (job, config but for output places,
seed, lock entry) must be the record's, then metrics, criteria, decision, the locked entry digest, the dataset
provenance, the backbone weights digest and the parameters must be identical as JSON values.

Tolerance: 0 (bit for bit) when the rerun's host is the record's (same device, Python, torch and packages).
Across hosts, another CPU's kernels change float bits (G1's CIs moved by ~1e-5 when the record's own commit
was rerun here, on another VM), so floats are compared to an absolute 1e-3 and everything else exactly
(decision, outcomes, counts, methods, digests); a planted code drift (G4's scores, 1 % noise) exceeds it.
Gates that train (G8, G9) compound those bits through training (G9 here: one test image of 150 changed class,
the weights digest differs), so across hosts they are compared on protocol, decision, each criterion's outcome,
metric names, counts and methods only. Metrics that time the host (G5's ``wallclock_speedup``) are never
compared: present in both, never equal.

Cost: G1-G7 reuse the unperturbed run of the whole-job leak check (tests/leak_harness.py), so a session that
runs both runs each job once; G8 and G9 are run once here.

That the committed record's commit is its own is the audit's check (the tree id of the commit); a swap to a
real commit is planted on each committed record below.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from covtoken.record import iter_record_paths
from covtoken.reproduce import COMPARED, compare_records, protocol_differences
from leak_harness import GATE_JOBS, OTHER_SMOKE_JOBS, head_smoke_record

REPORTS = REPO_ROOT / "gate_reports"
#: compared at HEAD: everything ``covtoken reproduce`` compares but the code commit (HEAD is another commit)
AT_HEAD = tuple(f for f in COMPARED if f != ("provenance", "code", "commit"))


#: options of a record's command that name places, not the protocol (the rerun sets its own)
_PLACES = frozenset({"--results", "--run-id", "--work-dir", "--lock"})


def protocol_options(rec: dict) -> tuple[str, ...]:
    """The options of a record's job command beyond ``--smoke`` and its output places (e.g. ``--seed 1``)."""
    args, out, i = rec["provenance"]["command"][1:], [], 0
    while i < len(args):
        if args[i] in _PLACES:
            i += 2
            continue
        if args[i] != "--smoke":
            out.append(args[i])
        i += 1
    return tuple(out)


def committed_embedded() -> dict[str, Path]:
    """name -> a committed record judged under an embedded entry (``Gx/embedded``, ``Gx/embedded-trained``) at the
    top level of gate_reports/ (samples/ holds no embedded record); the name is the gate, plus the options of its
    command when it is not the plain ``--smoke`` run (e.g. ``G1 --seed 1``)."""
    out: dict[str, Path] = {}
    for p in iter_record_paths(REPORTS):
        if p.parent != REPORTS:
            continue
        rec = json.loads(p.read_text())
        gate, entry = rec["gate_id"], rec["lock"]["entry"]
        if entry.split("/", 1)[1].startswith("embedded"):
            name = " ".join([gate, *protocol_options(rec)])
            assert name not in out, f"two committed records of one protocol ({name}): {out[name].name}, {p.name}"
            out[name] = p
    return out


#: Absolute tolerance on floats when the rerun's host is not the record's (see the module docstring).
HOST_TOLERANCE = 1e-3
#: Gates that train (G8 pretrains, G9 fine-tunes): float bits compound through training, so on another host one
#: test image can change its class and the weights digest differs (seen on G9: top-1 moved by 1/150). Across
#: hosts these are compared on their outcome only: decision, each criterion's outcome, metric names and counts.
TRAINING_GATES = frozenset({"G8", "G9"})
#: Metrics that time the host itself (never reproducible, on any host): present in both, not compared.
HOST_TIMINGS = frozenset({"wallclock_speedup"})


def _without_timings(rec: dict) -> dict:
    out = json.loads(json.dumps(rec))
    for k in HOST_TIMINGS & set(out["metrics"]):
        out["metrics"][k] = "<a timing of the host>"
    return out


def _beyond(a: object, b: object, tol: float, where: str) -> list[str]:
    """Leaves of two JSON values that differ: floats by more than ``tol``, anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _beyond(a.get(k, "<absent>"), b.get(k, "<absent>"), tol,
                                                                     f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _beyond(x, y, tol, f"{where}/{i}")]
    if isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
        return [] if abs(a - b) <= tol else [f"{where}: original {a!r}, rerun {b!r} (|diff| {abs(a - b):.3g} > {tol:g})"]
    return [] if a == b else [f"{where}: original {a!r}, rerun {b!r}"]


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _numbers_masked(value: object, field: tuple[str, ...]) -> object:
    """``decision_reason`` with its printed numbers masked: they are the criteria's observed values, compared
    within the tolerance as floats; printed, a last digit may round the other way on another host."""
    return _NUMBER.sub("#", value) if field == ("decision_reason",) and isinstance(value, str) else value


def drift(committed: dict, rerun: dict, tol: float = 0.0) -> list[str]:
    """Why ``rerun`` does not reproduce ``committed`` (empty: it does): bit for bit (``tol`` 0), or with every
    float of the compared fields within ``tol`` and everything else (decision, outcomes, counts, methods,
    dataset, lock entry digest, weights digest, parameters) identical."""
    proto = protocol_differences(committed, rerun)
    if proto:
        return [f"not the record's protocol: {d}" for d in proto]
    committed, rerun = _without_timings(committed), _without_timings(rerun)
    if tol > 0:
        diffs = [d for f in AT_HEAD for d in _beyond(_numbers_masked(canonical_get(committed, f), f),
                                                      _numbers_masked(canonical_get(rerun, f), f), tol, "/".join(f))]
    else:
        diffs = compare_records(committed, rerun, fields=AT_HEAD)
    if diffs:
        pa, pb = committed["provenance"], rerun["provenance"]
        env = [f"{k}: {pa.get(k)!r} -> {pb.get(k)!r}" for k in ("python", "torch", "packages") if pa.get(k) != pb.get(k)]
        if env:
            diffs.append("environment differs from the record's (may explain differing bits; rerun the records): "
                         + "; ".join(env))
    return diffs


COMMITTED = committed_embedded()


def test_every_committed_embedded_record_is_reproduced():
    """Each committed record's gate has a --smoke job run here (a new gate's record cannot slip past)."""
    assert COMMITTED, "no committed embedded record in gate_reports/"
    gates = {json.loads(p.read_text())["gate_id"] for p in COMMITTED.values()}
    unrun = sorted(gates - set(GATE_JOBS) - set(OTHER_SMOKE_JOBS))
    assert not unrun, f"committed records of {unrun}: add their --smoke job to tests/leak_harness.py"
    for path in COMMITTED.values():
        rec = json.loads(path.read_text())
        job = (GATE_JOBS | OTHER_SMOKE_JOBS)[rec["gate_id"]]
        assert rec["provenance"]["command"][0] == f"jobs/{job}.py", path.name


def outcome_drift(committed: dict, rerun: dict) -> list[str]:
    """The cross-host check of a training gate: protocol, decision, criterion outcomes, metric names and counts."""
    proto = protocol_differences(committed, rerun)
    if proto:
        return [f"not the record's protocol: {d}" for d in proto]
    out = []
    if committed["decision"] != rerun["decision"]:
        out.append(f"decision: original {committed['decision']!r}, rerun {rerun['decision']!r}")
    oc = [(c["id"], c["outcome"]) for c in committed["criteria"]]
    orr = [(c["id"], c["outcome"]) for c in rerun["criteria"]]
    if oc != orr:
        out.append(f"criteria outcomes: original {oc}, rerun {orr}")
    shape = {k: (m.get("n"), m.get("unit"), m.get("ci_method")) if isinstance(m, dict) else m
             for k, m in committed["metrics"].items()}
    shape2 = {k: (m.get("n"), m.get("unit"), m.get("ci_method")) if isinstance(m, dict) else m
              for k, m in rerun["metrics"].items()}
    out += [f"metrics/{k}: original {shape.get(k)!r}, rerun {shape2.get(k)!r}"
            for k in sorted(set(shape) | set(shape2)) if shape.get(k) != shape2.get(k)]
    for f in (("lock", "entry_digest"), ("provenance", "dataset"), ("provenance", "parameters")):
        if canonical_get(committed, f) != canonical_get(rerun, f):
            out.append(f"{'/'.join(f)} differs")
    return out


def canonical_get(doc: dict, path: tuple[str, ...]) -> object:
    from covtoken.eval.recompute import canonical
    from covtoken.reproduce import _get

    return canonical(_get(doc, path))


def same_host(a: dict, b: dict) -> bool:
    """Whether two records provably ran on the same kind of host: device (with the CPU model), Python, torch and
    packages all equal. A record that does not name its CPU model (made before the kit recorded it) cannot prove it:
    VMs with one kernel string run on different CPUs, whose kernels change float bits."""
    if not all(r["provenance"]["device"].get("cpu_model") for r in (a, b)):
        return False
    return all(a["provenance"].get(k) == b["provenance"].get(k) for k in ("device", "python", "torch", "packages"))


@pytest.mark.slow
@pytest.mark.parametrize("gate", sorted(COMMITTED))
def test_committed_embedded_record_reproduces_at_head(gate, tmp_path_factory):
    committed = json.loads(COMMITTED[gate].read_text())
    rerun = json.loads(head_smoke_record(committed["gate_id"], tmp_path_factory,
                                         protocol_options(committed)).read_text())
    if committed["gate_id"] in TRAINING_GATES and not same_host(committed, rerun):
        assert outcome_drift(committed, rerun) == [], f"{COMMITTED[gate].name}: another outcome at HEAD (another host)"
        return
    tol = 0.0 if same_host(committed, rerun) else HOST_TOLERANCE
    assert drift(committed, rerun, tol) == [], (f"{COMMITTED[gate].name} does not reproduce at HEAD "
                                                f"({'bit for bit, same host' if tol == 0 else f'within {tol:g}, another host'})")


# ------------------------------------------------------------------------------------ the check can fail
def _twin(gate: str) -> tuple[dict, dict]:
    doc = json.loads(COMMITTED[gate].read_text())
    return doc, json.loads(json.dumps(doc))


@pytest.mark.parametrize("gate", sorted(COMMITTED))
def test_a_one_bit_metric_drift_is_caught(gate):
    committed, rerun = _twin(gate)
    assert drift(committed, rerun) == []
    name, m = next((k, v) for k, v in sorted(rerun["metrics"].items())
                   if isinstance(v, dict) and isinstance(v.get("value"), float) and math.isfinite(v["value"]))
    m["value"] = math.nextafter(m["value"], math.inf)
    out = drift(committed, rerun)
    assert out and any(f"metrics/{name}" in d for d in out), out


@pytest.mark.parametrize("gate", sorted(COMMITTED))
def test_the_host_tolerance_admits_small_float_differences_only(gate):
    committed, rerun = _twin(gate)
    name, m = next((k, v) for k, v in sorted(rerun["metrics"].items())
                   if isinstance(v, dict) and isinstance(v.get("value"), float) and math.isfinite(v["value"]))
    v = m["value"]
    m["value"] = v + HOST_TOLERANCE / 4  # a kernel-level difference: admitted across hosts, never on the same host
    assert drift(committed, rerun, HOST_TOLERANCE) == [] and drift(committed, rerun)
    m["value"] = v + 2 * HOST_TOLERANCE  # beyond it: code drift
    assert any(f"metrics/{name}/value" in d for d in drift(committed, rerun, HOST_TOLERANCE))
    m["value"] = v
    rerun["decision"] = "pass" if committed["decision"] != "pass" else "fail"  # never within a tolerance
    assert drift(committed, rerun, HOST_TOLERANCE)
    named = json.loads(json.dumps(committed))
    named["provenance"]["device"]["cpu_model"] = "Some CPU"
    assert same_host(named, json.loads(json.dumps(named)))
    anonymous = json.loads(json.dumps(committed))
    anonymous["provenance"]["device"].pop("cpu_model", None)  # records made before issue 15's fix lack it
    assert not same_host(anonymous, json.loads(json.dumps(anonymous))), "a host without its CPU model proves nothing"
    for key, value in (("cpu_count", -1), ("cpu_model", "Another CPU")):
        other = json.loads(json.dumps(named))
        other["provenance"]["device"][key] = value
        assert not same_host(named, other), key
    # the numbers printed in decision_reason follow the tolerance; its words never do
    committed, rerun = _twin(gate)
    rerun["decision_reason"] = committed["decision_reason"] + " 0.123"
    committed["decision_reason"] += " 0.124"
    assert drift(committed, rerun, HOST_TOLERANCE) == [] and drift(committed, rerun)
    rerun["decision_reason"] = rerun["decision_reason"].replace(" 0.123", " other words 0.124")
    assert any("decision_reason" in d for d in drift(committed, rerun, HOST_TOLERANCE))


@pytest.mark.parametrize("gate", sorted(TRAINING_GATES & set(COMMITTED)))
def test_the_outcome_check_of_training_gates_can_fail(gate):
    committed, rerun = _twin(gate)
    assert outcome_drift(committed, rerun) == []
    rerun["decision"] = "pass" if committed["decision"] != "pass" else "fail"
    assert outcome_drift(committed, rerun)
    committed, rerun = _twin(gate)
    rerun["criteria"][0]["outcome"] = "not met" if committed["criteria"][0]["outcome"] == "met" else "met"
    assert outcome_drift(committed, rerun)
    committed, rerun = _twin(gate)
    next(m for m in rerun["metrics"].values() if isinstance(m, dict))["n"] = {"patients": -1}
    assert outcome_drift(committed, rerun)
    committed, rerun = _twin(gate)
    rerun["provenance"]["seed"] = rerun["provenance"]["config"]["seed"] = 7
    assert outcome_drift(committed, rerun)


def test_only_host_timings_escape_the_comparison():
    """The excluded metrics are timings (their description says so) and no criterion judges one."""
    timed = {k for p in COMMITTED.values() for k, m in json.loads(p.read_text())["metrics"].items()
             if "timing" in str(m.get("description", "")).lower()}
    assert HOST_TIMINGS == timed, timed
    for p in COMMITTED.values():
        assert not {c["metric"] for c in json.loads(p.read_text())["criteria"]} & HOST_TIMINGS, p.name
    committed, rerun = _twin("G5")
    rerun["metrics"]["wallclock_speedup"]["value"] += 1.0  # another host, another load: not drift
    assert drift(committed, rerun) == []
    del rerun["metrics"]["wallclock_speedup"]  # but it must be there
    assert drift(committed, rerun)


@pytest.mark.parametrize("field", ["criterion", "decision", "entry_digest", "dataset", "parameters", "weights"])
def test_drift_outside_the_metrics_is_caught(field):
    committed, rerun = _twin("G1")
    if field == "criterion":
        rerun["criteria"][0]["observed"] = "changed"
    elif field == "decision":
        rerun["decision"] = "pass" if committed["decision"] != "pass" else "fail"
    elif field == "entry_digest":
        rerun["lock"]["entry_digest"] = "sha256:" + "0" * 64
    elif field == "dataset":
        rerun["provenance"]["dataset"]["n_patients"] = -1
    elif field == "parameters":
        rerun["provenance"]["parameters"] = {**rerun["provenance"]["parameters"], "planted": 1}
    else:
        rerun["provenance"]["backbone"]["weights_digest"] = "sha256:" + "1" * 64
    assert drift(committed, rerun), field


@pytest.mark.parametrize("change", ["seed", "smoke", "config", "job", "entry", "new-option-set", "new-option-config"])
def test_a_run_at_another_protocol_is_not_a_reproduction(change):
    committed, rerun = _twin("G1")
    prov = rerun["provenance"]
    if change == "seed":
        prov["seed"] = prov["config"]["seed"] = 1
    elif change == "smoke":
        prov["config"]["smoke"] = not prov["config"]["smoke"]
    elif change == "config":
        prov["config"]["batch_size"] = prov["config"]["batch_size"] + 1
    elif change == "job":
        prov["command"] = ["jobs/g3_membership_vs_saliency.py", *prov["command"][1:]]
    elif change.startswith("new-option"):  # an option the original's code did not have, set by the rerun
        prov["config"]["dims"] = 3
        prov["command"] = [*prov["command"], *(["--dims", "3"] if change == "new-option-set" else ["--config=x.json"])]
    else:
        rerun["lock"]["entry"] = "G1/some-other-entry"
    out = drift(committed, rerun)
    assert out and all(d.startswith("not the record's protocol") for d in out), out
    # where the job wrote is not protocol
    committed2, rerun2 = _twin("G1")
    rerun2["provenance"]["config"].update(results="/elsewhere", run_id="g1-x", work_dir="/w", lock="/l.json")
    assert drift(committed2, rerun2) == []
    # an option added since the original was made, left at its default (not on the command line), is not protocol:
    # the compared results say whether the default kept the original behaviour
    rerun2["provenance"]["config"]["dims"] = 2
    assert drift(committed2, rerun2) == []


#: a drift in G4's label-free scores (one percent of noise): its metrics change, its protocol does not
PLANTED_G4 = [("    return bank, rows, scores\n",
               "    return bank, rows, scores * (1 + 0.01 * np.random.default_rng(1).standard_normal(scores.shape))\n")]


@pytest.mark.slow
def test_planted_code_drift_is_caught(tmp_path):
    """The drift check, given a G4 run at HEAD with a one-line change planted in the job, reports the metrics."""
    from g1_helpers import copy_lock
    from leak_harness import _args, load_job_source

    lock = copy_lock(tmp_path)
    job = load_job_source("g4_conformal_retention", PLANTED_G4)
    assert job.main(_args("g4_conformal_retention", tmp_path / "ref", tmp_path / "work", lock)) == 0
    (path,) = sorted((tmp_path / "ref").glob("*.json"))
    out = drift(json.loads(COMMITTED["G4"].read_text()), json.loads(path.read_text()), HOST_TOLERANCE)  # caught even
    # under the cross-host tolerance
    assert any(d.startswith("metrics/") for d in out), out
    assert not any(d.startswith("not the record's protocol") for d in out), out


@pytest.mark.parametrize("gate", sorted(COMMITTED))
def test_a_commit_swap_in_a_committed_record_fails_the_audit(gate):
    """The committed record with its commit swapped for its parent (a real commit) fails the audit's code check;
    the record as committed passes it. (The whole audit of gate_reports/ is test_audit.py's.)"""
    from covtoken.audit import RecordAudit
    from covtoken.audit_integrity import check_code
    from covtoken.provenance import git

    rec = json.loads(COMMITTED[gate].read_text())
    ra = RecordAudit(COMMITTED[gate], rec)
    check_code(ra, allow_dirty=False)
    assert ra.problems == [] and rec["provenance"]["code"].get("tree"), "the committed record must carry its tree id"
    parent = git(REPO_ROOT, "rev-parse", f"{rec['provenance']['code']['commit']}~1", check=False).strip()
    if not parent:
        pytest.skip("shallow clone: the record's commit has no parent here")
    swapped = json.loads(json.dumps(rec))
    swapped["provenance"]["code"]["commit"] = parent
    ra = RecordAudit(COMMITTED[gate], swapped)
    check_code(ra, allow_dirty=False)
    assert any("provenance/code/tree" in p and "commit was changed" in p for p in ra.problems), ra.problems
