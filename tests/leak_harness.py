"""The whole-job label-leak check: rerun a gate's --smoke job with the labels of later roles perturbed.

Roles (fit -> select -> calibrate -> judge, see covtoken.roles) map to splits in each record's
``provenance.dataset.splits``. For every role R that hands something on, the job is rerun in-process with the
masks and labels of the patients of every later role perturbed (and of R's own split when R is label-free:
every fit of G1-G7 is), and each quantity R and the roles before it marked with ``role_output`` must be
bit-identical to the unperturbed run. The perturbation must also reach the job: some later-role quantity has to
change (or a later role has to fail on the perturbed labels); otherwise the check proves nothing.

The token bank is shared between the runs (it depends on images only), so a rerun costs seconds.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

from covtoken.data import catalog
from covtoken.data.perturb import perturb_labels
from covtoken.roles import ROLES, RoleLog, RoleStop, recording
from conftest import REPO_ROOT
from g1_helpers import copy_lock, load_job

#: roles that may not read the labels of their own split either (a supervised fit, e.g. a classifier, would not
#: be listed for its gate)
LABEL_FREE_ROLES = frozenset({"fit"})
#: perturbations applied per role: the label-free fit also gets empty masks (its job may then fail in a later role)
HOWS = {"fit": ("permuted", "zeroed"), "select": ("permuted", "flipped"), "calibrate": ("permuted", "flipped")}
#: the cheaper set the default suite runs (one rerun per later role; both perturbations for the label-free fit)
HOWS_FAST = {"fit": ("permuted", "zeroed"), "select": ("permuted",), "calibrate": ("flipped",)}

GATE_JOBS = {"G1": "g1_lesion_subspace", "G2": "g2_cross_modality", "G3": "g3_membership_vs_saliency",
             "G4": "g4_conformal_retention", "G5": "g5_routed_depth", "G6": "g6_coverage_pruner",
             "G7": "g7_dermajepa_probe"}


#: jobs without a --work-dir flag (nothing cached between runs)
NO_WORK_DIR = frozenset({"g7_dermajepa_probe", "g9_classifier"})


@dataclass
class Reference:
    """The unperturbed run of a job: its role digests and which patients each role's split holds."""

    job: str
    base: Path
    lock: Path
    log: RoleLog
    roles: dict[str, str]                          # role -> split name
    membership: dict[str, dict[str, frozenset]]    # dataset id -> split -> patient ids
    loaded: dict                                   # (name, options) -> LoadedDataset, generated once per gate
    loader: Callable[[], ModuleType]               # imports the job (a planted leak patches it here)
    work: Path                                     # token banks


def _args(job: str, results: Path, work: Path, lock: Path) -> list[str]:
    args = ["--smoke", "--results", str(results), "--lock", str(lock)]
    return args if job in NO_WORK_DIR else [*args, "--work-dir", str(work)]


def run_reference(job: str, base: Path, loader: Callable[[], ModuleType] | None = None,
                  work: Path | None = None) -> Reference:
    """Run ``jobs/<job>.py --smoke`` once, recording role outputs; read roles and split membership off its record.

    Args:
        job: job script name under jobs/.
        base: an empty folder for the runs.
        loader: imports the job module (default: the script as it is).
        work: token-bank folder shared with other references of the same job (default ``base/work``).
    """
    base.mkdir(parents=True, exist_ok=True)
    lock = copy_lock(base)
    results = base / "ref"
    loader = loader or (lambda: load_job(job))
    work = work or base / "work"
    with recording() as log:
        assert loader().main(_args(job, results, work, lock)) == 0
    (record_path,) = sorted(results.glob("*.json"))
    rec = json.loads(record_path.read_text())
    split_info = rec["provenance"]["dataset"]["splits"]
    roles = {r: split_info[r] for r in ROLES if r in split_info}
    art = record_path.parent / "artefacts" / rec["run_id"]
    if (art / "per_modality.json").is_file():  # G2: one dataset per modality
        per = json.loads((art / "per_modality.json").read_text())
        membership = {m["dataset"]["id"]: {k: frozenset(v) for k, v in m["splits"]["membership"].items()}
                      for m in per.values()}
    else:
        splits = json.loads((art / "splits.json").read_text())
        membership = {rec["provenance"]["dataset"]["id"]: {k: frozenset(v) for k, v in splits["membership"].items()}}
    assert roles.get("fit") and roles.get("judge"), f"{job}: record names no fit/judge split: {split_info}"
    assert any(log.entries[r] for r in ROLES), f"{job}: the job marks no role output"
    return Reference(job, base, lock, log, roles, membership, {}, loader, work)


def perturbed_splits(ref: Reference, role: str) -> set[str]:
    """Splits whose labels ``role`` may not see: those of later roles, its own when label-free, and role-less ones."""
    later = {ref.roles[r] for r in ROLES[ROLES.index(role) + 1:] if r in ref.roles}
    if role in LABEL_FREE_ROLES:
        later.add(ref.roles[role])
    named = set(ref.roles.values())
    any_membership = next(iter(ref.membership.values()))
    return later | {s for s in any_membership if s not in named}


@contextmanager
def perturbed_loading(ref: Reference, splits: set[str], how: str) -> Iterator[list[int]]:
    """Every dataset a job loads comes back with the labels of ``splits``' patients perturbed."""
    original = catalog.load_dataset
    counts: list[int] = []

    def load(name: str, **options):  # noqa: ANN003, ANN202
        key = (name, json.dumps(options, sort_keys=True, default=str))
        if key not in ref.loaded:  # the unperturbed dataset is immutable: load it once per gate
            ref.loaded[key] = original(name, **options)
        data = ref.loaded[key]
        member = ref.membership.get(data.provenance["id"])
        assert member is not None, f"{ref.job} loaded {data.provenance['id']}, unseen in the reference run"
        patients = set().union(*(member[s] for s in splits))
        ids = [it.image_id for it in data.items if it.patient_id in patients]
        assert ids, f"no image of splits {sorted(splits)} in {data.provenance['id']}"
        counts.append(len(ids))
        return catalog.LoadedDataset(data.items, perturb_labels(data.masks, ids, how, seed=7), data.provenance)

    catalog.load_dataset = load
    try:
        yield counts
    finally:
        catalog.load_dataset = original


def run_perturbed(ref: Reference, role: str, how: str, tag: str = "") -> tuple[RoleLog, BaseException | None]:
    """Rerun the job with the labels role ``role`` may not see perturbed; stop after the first later-role output."""
    results = ref.base / f"run-{role}-{how}{tag}"
    exc: BaseException | None = None
    with perturbed_loading(ref, perturbed_splits(ref, role), how) as counts, \
            recording(stop_after=role, need=set(ref.log.upto(role))) as log:
        try:
            rc = ref.loader().main(_args(ref.job, results, ref.work, ref.lock))
            if rc != 0:  # job_main reports an expected error as one line and exit 2
                exc = RuntimeError(f"the job exited {rc}")
        except RoleStop:
            pass
        except Exception as e:  # noqa: BLE001 - a later role may fail on perturbed labels; judged below
            exc = e
    assert counts, f"{ref.job} loaded no dataset through covtoken.data.catalog"
    return log, exc


def role_problems(ref: Reference, tag: str = "", hows: dict | None = None) -> list[str]:
    """Every way the job's earlier roles depend on later roles' labels (empty: none found).

    Args:
        ref: the unperturbed run.
        tag: suffix of the rerun folders.
        hows: role -> perturbations to apply (default :data:`HOWS`); roles left out are not checked.
    """
    problems = []
    hows = HOWS if hows is None else hows
    for role in [r for r in ROLES[:-1] if r in hows]:
        if not ref.log.upto(role) or not ref.log.after(role) or role not in ref.roles:
            continue  # nothing handed on by this role, or nothing after it to perturb
        want = ref.log.upto(role)
        for how in hows[role]:
            log, exc = run_perturbed(ref, role, how, tag)
            got = log.upto(role)
            for key in want:
                if key not in got and how == "zeroed" and exc is not None and got:
                    continue  # empty labels ended the job in a later role (e.g. G2's first judge) before this output
                if key not in got:
                    problems.append(f"{role}/{how}: {key} never produced ({type(exc).__name__ if exc else 'no error'}: "
                                    f"{exc})")
                elif got[key] != want[key]:
                    problems.append(f"{role}/{how}: {key} changed when labels of splits "
                                    f"{sorted(perturbed_splits(ref, role))} were {how}")
            extra = sorted(set(got) - set(want))
            if extra:
                problems.append(f"{role}/{how}: role outputs {extra} appear only with {how} labels")
            later = log.after(role)
            reached = exc is not None or any(ref.log.after(role).get(k) != v for k, v in later.items())
            if how == "permuted" and not reached:
                problems.append(f"{role}/{how}: the perturbation changed no later-role output; the check proves nothing")
    return problems


_CLEAN: dict[str, Reference] = {}


def clean_reference(job: str, tmp_factory) -> Reference:  # noqa: ANN001 (pytest's TempPathFactory)
    """The unperturbed, unpatched reference of ``job``, made once per test session."""
    if job not in _CLEAN:
        _CLEAN[job] = run_reference(job, tmp_factory.mktemp(f"clean-{job}"))
    return _CLEAN[job]


def load_job_source(job: str, replacements: list[tuple[str, str]]) -> ModuleType:
    """Import ``jobs/<job>.py`` with its source edited (a planted leak); each ``old`` must occur exactly once."""
    import importlib.util
    import sys

    path = REPO_ROOT / "jobs" / f"{job}.py"
    source = path.read_text()
    for old, new in replacements:
        assert source.count(old) == 1, f"planted leak no longer applies to {path.name}: {old!r}"
        source = source.replace(old, new)
    name = f"covtoken_job_{job}_planted"
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(path)
    sys.modules[name] = mod
    exec(compile(source, str(path), "exec"), mod.__dict__)  # noqa: S102 - our own job script, edited by a test
    return mod


#: gates whose --smoke job the leak check does not run: their HEAD run for the reproduction check is made here
OTHER_SMOKE_JOBS = {"G8": "g8_lejepa_pretrain", "G9": "g9_classifier"}
_HEAD: dict[tuple[str, tuple[str, ...]], Path] = {}


def head_smoke_record(gate: str, tmp_factory, extra: tuple[str, ...] = ()) -> Path:  # noqa: ANN001 (TempPathFactory)
    """The record of ``gate``'s ``--smoke`` job (plus ``extra`` options, e.g. ``--seed 1``) run once per session at
    HEAD, under a copy of the repository's lock.

    With no ``extra``, G1-G7 reuse the unperturbed leak-check reference (the same protocol: ``--smoke``, default
    seed, the repository's lock entry), so a session running both checks runs each job once; anything else runs
    here, once per (gate, options).
    """
    if not extra and gate in GATE_JOBS:
        ref = clean_reference(GATE_JOBS[gate], tmp_factory)
        (path,) = sorted((ref.base / "ref").glob("*.json"))
        return path
    key = (gate, tuple(extra))
    if key not in _HEAD:
        job = (GATE_JOBS | OTHER_SMOKE_JOBS)[gate]
        base = tmp_factory.mktemp(f"head-{gate}")
        lock = copy_lock(base)
        results = base / "ref"
        assert load_job(job).main([*_args(job, results, base / "work", lock), *extra]) == 0
        (_HEAD[key],) = sorted(results.glob("*.json"))
    return _HEAD[key]
