"""HF Jobs backend end to end on the Hub emulator, with the real G1 job on the embedded default.

submit (bundle at a fresh commit, run_job, volume pinned) -> logs -> wait -> fetch -> audit; a job killed
after two token-bank shards resumes from the Hub to the same decision and the same numbers; cancel; a job
that ends in ERROR gives a clear message and no record; and the fake token appears nowhere.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi

from hfjobs_support import (FAKE_TOKEN, G1, NS, attempt_logs, covtoken, fake_token, grep_tree, head,  # noqa: F401
                            hf_cache, jobs_of, log_events, new_repo, snapshot, wait_until)
from hub_emulator import HubEmulator, hub  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
LOG_EVERY = "2"


@pytest.fixture(scope="module")
def repo(fake_token: str) -> str:
    return new_repo()


@pytest.fixture(scope="module")
def roundtrip(hub: HubEmulator, fake_token: str, snapshot: Path, repo: str, tmp_path_factory) -> dict[str, Any]:
    """submit --detach -> logs -f -> wait -> fetch (+ audit): the CI round trip, done once for the module."""
    reports = tmp_path_factory.mktemp("rt") / "gate_reports"
    sub = covtoken("submit", G1, "--results-repo", repo, "--flavor", "cpu-basic", "--timeout", "10m", "--yes",
                   "--detach", "--log-every", LOG_EVERY, "--", "--smoke", cwd=snapshot)
    assert sub.rc == 0, sub.text
    run_id = sub.out.strip().splitlines()[-1]
    logs = covtoken("logs", run_id, "-f", cwd=snapshot)
    wait = covtoken("wait", run_id, cwd=snapshot)
    fetch = covtoken("fetch", "--allow-unproven-prereg", run_id, "--results", str(reports), cwd=snapshot)
    return {"run_id": run_id, "submit": sub, "logs": logs, "wait": wait, "fetch": fetch, "reports": reports}


def test_round_trip_submit_logs_wait_fetch_audit(hub: HubEmulator, roundtrip, snapshot: Path, repo: str) -> None:
    rid, reports = roundtrip["run_id"], roundtrip["reports"]
    assert "worst case" in roundtrip["submit"].err and "$0.01/hour" in roundtrip["submit"].err
    # pasteable next steps, one per line (never joined into a pipeline)
    assert "|" not in roundtrip["submit"].err
    assert f"    covtoken logs {rid} -f\n" in roundtrip["submit"].err and f"    covtoken wait {rid}\n" in roundtrip["submit"].err
    assert roundtrip["logs"].rc == 0 and roundtrip["wait"].rc == 0, roundtrip["wait"].text
    assert "ended COMPLETED" in roundtrip["wait"].err
    assert roundtrip["fetch"].rc == 0, roundtrip["fetch"].text
    assert "all decisions recomputed" in roundtrip["fetch"].out  # the audit table
    rec = json.loads((reports / f"{rid}.json").read_text())
    assert rid in (reports / "SUMMARY.md").read_text()

    # the code: the bundle's commit (a commit that exists only in the snapshot), clean, from the bundle
    tree = head(snapshot, "HEAD^{tree}")
    assert rec["provenance"]["code"] == {"commit": head(snapshot), "dirty": False, "diff_sha256": None,
                                         "source": "bundle", "tree": tree}  # the tree lets the audit catch a swap
    # the backend: the job found by its labels, flavor, image, results repo, hardware, pinned bundle
    (job,) = jobs_of(hub, rid)
    be = rec["provenance"]["backend"]
    assert be["name"] == "hf-jobs" and be["job_id"] == job.id and be["flavor"] == "cpu-basic"
    assert be["image"] == job.spec["dockerImage"] and be["results_repo"] == repo and be["attempt"] == 0
    assert "image_digest" in be and be["image_digest"] is None  # the table's CPU image has no verified digest
    assert be["image_requested"] == job.spec["environment"]["COVTOKEN_IMAGE"] == be["image"]  # as launched
    assert be["attempts_allowed"] == 1
    assert be["hardware"]["name"] == "cpu-basic" and be["hardware"]["usd_per_hour"] == pytest.approx(0.01, abs=1e-4)
    vol = job.spec["volumes"][0]
    assert vol["mountPath"] == "/code" and vol.get("readOnly") is True and vol["path"] == f"runs/{rid}/code"
    assert be["bundle"] == {"repo": repo, "path": f"runs/{rid}/code", "revision": vol["revision"]}
    assert rec["provenance"]["torch"] and rec["provenance"]["device"]["type"] == "cpu"
    assert job.spec["command"][:2] == ["python", "/code/launch.py"] and job.spec["command"][2:] == ["--smoke"]

    # the job ran the bundle: the mounted code at the pinned revision is the snapshot's, and the log says so
    api = HfApi()
    info = json.loads(Path(api.hf_hub_download(repo, f"runs/{rid}/code/build-info.json", repo_type="dataset",
                                               revision=vol["revision"])).read_text())
    job_sha = info["files"][G1]
    assert info["commit"] == head(snapshot) and info["dirty"] is False
    import hashlib
    assert job_sha == hashlib.sha256((snapshot / G1).read_bytes()).hexdigest()
    log = roundtrip["logs"].out
    assert f"commit {head(snapshot)}" in log and f"(sha256 {job_sha})" in log
    assert "already has every dependency at its pinned version" in log
    kit = hub.job_dir(job.id) / "work" / "covtoken-run" / "kit" / "covtoken"
    assert (kit / "runner.py").read_bytes() == (snapshot / "runner.py").read_bytes()

    # results landed as made: 4 shards (batched: at most one commit each), logs, the record last, with artefacts
    files = set(api.list_repo_files(repo, repo_type="dataset"))
    shards = sorted({f.split("/")[-2] for f in files if f.startswith(f"runs/{rid}/bank/") and "/shard-" in f})
    assert shards == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    assert f"runs/{rid}/logs/attempt-0.log" in files and f"runs/{rid}/attempts/0.json" in files
    assert {f"runs/{rid}/{a['path']}" for a in rec["artefacts"]} <= files
    titles = [c.title for c in api.list_repo_commits(repo, repo_type="dataset")]  # newest first
    rec_i = titles.index(next(t for t in titles if t.startswith(f"{rid}: record")))
    assert all(not t.startswith(f"{rid}: token-bank") for t in titles[:rec_i])  # no shard after the record
    assert sum(t.startswith(f"{rid}: token-bank") for t in titles) <= 4
    uploaded_log = Path(api.hf_hub_download(repo, f"runs/{rid}/logs/attempt-0.log", repo_type="dataset")).read_text()
    assert "record_uploaded" in uploaded_log and "exited with code 0" in uploaded_log

    # the dataset card: YAML metadata and the SUMMARY table regenerated from the repo's records
    card = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset")).read_text()
    meta = card.split("---")[1]
    assert "covtoken" in meta and f"- {rid}" in meta and "viewer: false" in meta
    assert "## Gate summary" in card and f"`{rid}`" in card and f"**{rec['decision']}**" in card


def test_nothing_secret_anywhere(hub: HubEmulator, roundtrip, snapshot: Path, repo: str, hf_cache: Path) -> None:
    rid = roundtrip["run_id"]
    (job,) = jobs_of(hub, rid)
    assert hub.job_secrets(job.id) == {"HF_TOKEN": FAKE_TOKEN}  # the token did reach the job, as a secret only
    assert FAKE_TOKEN not in json.dumps(job.spec.get("environment")) + json.dumps(job.spec.get("labels"))
    assert FAKE_TOKEN not in " ".join(job.spec["command"])
    needle = FAKE_TOKEN.encode()
    leaks = (grep_tree(hub.store.root / "dataset" / repo, needle)  # every blob of the results repo
             + grep_tree(hub.job_dir(job.id), needle)  # spec, log, the job's work folder (bundle copy, results)
             + grep_tree(roundtrip["reports"], needle) + grep_tree(snapshot / "results" / "bundles", needle)
             + grep_tree(hf_cache, needle))  # what the client downloaded
    assert leaks == []
    for step in ("submit", "logs", "wait", "fetch"):
        assert FAKE_TOKEN not in roundtrip[step].text, step
    info = HfApi().inspect_job(job_id=job.id, namespace=NS)
    assert FAKE_TOKEN not in json.dumps({"env": info.environment, "secrets": info.secrets, "labels": info.labels})


def test_killed_job_resumes_to_the_same_decision(hub: HubEmulator, roundtrip, snapshot: Path, repo: str,
                                                 monkeypatch, tmp_path: Path) -> None:
    """SIGKILL the job right after its second token-bank shard is committed; resume; same record numbers."""
    killed: dict[str, str] = {}
    original = hub.store.commit

    def commit_then_kill(rtype, repo_id, branch, title, message, ops, parent, create_branch=False):  # noqa: ANN001
        sha = original(rtype, repo_id, branch, title, message, ops, parent, create_branch)
        paths = [p for _, p, _ in ops]
        hit = [p for p in paths if "/bank/" in p and "/shard-00001/" in p]
        if hit and not killed:
            rid = hit[0].split("/")[1]
            (job,) = jobs_of(hub, rid)
            killed[rid] = job.id
            hub.kill_job(job.id, "Job was preempted (emulated)")  # the job is waiting for this very response
        return sha

    monkeypatch.setattr(hub.store, "commit", commit_then_kill)
    sub = covtoken("submit", G1, "--results-repo", repo, "--timeout", "10m", "--yes", "--detach", "--commit-every",
                   "0", "--", "--smoke", cwd=snapshot)  # one commit per shard: the kill lands after shard 1
    assert sub.rc == 0, sub.text
    rid = sub.out.strip().splitlines()[-1]
    wait = covtoken("wait", rid, cwd=snapshot)
    monkeypatch.setattr(hub.store, "commit", original)
    assert killed and rid in killed
    assert wait.rc == 1 and "ended ERROR: Job was preempted (emulated)" in wait.err
    assert f"No record was written for run {rid}" in wait.err and f"--resume {rid}" in wait.err
    api = HfApi()
    files = api.list_repo_files(repo, repo_type="dataset")
    assert not any(f == f"runs/{rid}/{rid}.json" for f in files)
    assert sorted({f.split("/")[-2] for f in files if f.startswith(f"runs/{rid}/bank/") and "/shard-" in f}) == \
        ["shard-00000", "shard-00001"]
    status = covtoken("status", rid, cwd=snapshot)
    assert "ERROR" in status.out and "2 token-bank shard(s) uploaded; record not written" in status.err

    # the job args of a resume are the first attempt's; changing them is refused
    bad = covtoken("submit", G1, "--resume", rid, "--results-repo", repo, "--yes", "--", "--seed", "1", cwd=snapshot)
    assert bad.rc == 2 and "arguments are those of the first attempt" in bad.err
    res = covtoken("submit", G1, "--resume", rid, "--yes", "--detach", cwd=snapshot)  # repo found from its jobs
    assert res.rc == 0, res.text
    assert covtoken("wait", rid, cwd=snapshot).rc == 0
    first, second = jobs_of(hub, rid)
    assert second.spec["volumes"] == first.spec["volumes"]  # the same bundle commit
    assert second.spec["command"] == first.spec["command"] and second.spec["environment"]["COVTOKEN_ATTEMPT"] == "1"
    log2 = "\n".join(hub.job_logs(second.id))
    restored = [json.loads(ln[ln.index("{"):]) for ln in log2.splitlines() if '"event": "bank_restored"' in ln]
    assert len(restored) == 1 and restored[0]["shards"] == 2 and restored[0]["bank"].startswith("phantom-ct"), log2
    done = [ln for ln in log2.splitlines() if '"event": "shard_done"' in ln]
    assert [json.loads(ln[ln.index("{"):])["shard"] for ln in done] == ["00002", "00003"]  # only the missing ones

    reports = tmp_path / "gate_reports"
    fetch = covtoken("fetch", "--allow-unproven-prereg", rid, "--results", str(reports), cwd=snapshot)
    assert fetch.rc == 0, fetch.text
    resumed = json.loads((reports / f"{rid}.json").read_text())
    whole = json.loads((roundtrip["reports"] / f"{roundtrip['run_id']}.json").read_text())
    assert resumed["decision"] == whole["decision"]
    assert resumed["metrics"] == whole["metrics"] and resumed["criteria"] == whole["criteria"]
    assert resumed["provenance"]["backend"]["job_id"] == second.id and resumed["provenance"]["backend"]["attempt"] == 1
    assert any("2 token-bank shard(s)" in n and "restored" in n for n in resumed["notes"])
    # both attempts are in the local ledger, as a local run resumed under its run id would be
    from covtoken.runstore import read_ledger
    mine = [e for e in read_ledger(reports) if e["run_id"] == rid]
    assert [(e["event"], e["attempt"], e["job_id"]) for e in mine] == [("start", 0, first.id), ("resume", 1, second.id)]
    again = covtoken("submit", G1, "--resume", rid, "--results-repo", repo, "--yes", cwd=snapshot)
    assert again.rc == 2 and "finished; nothing to resume" in again.err


def test_a_run_whose_record_was_deleted_on_the_hub_is_listed_by_the_audit(hub: HubEmulator, roundtrip,
                                                                           snapshot: Path, repo: str, tmp_path: Path) -> None:
    """fetch brings a Hub run's start facts into the local ledger: a run whose record was deleted on the Hub is
    reported by `covtoken audit` like a local run started without a record (never silently gone)."""
    from covtoken.runstore import read_ledger

    api = HfApi()
    rid = roundtrip["run_id"]
    other = new_repo()  # a copy of the round trip's run (the module's repo stays whole for the other tests)
    api.create_repo(other, repo_type="dataset", private=True)
    got = Path(api.snapshot_download(repo, repo_type="dataset", local_dir=tmp_path / "copy",
                                     allow_patterns=[f"runs/{rid}/attempts/*", f"runs/{rid}/code/build-info.json",
                                                     f"runs/{rid}/{rid}.json", f"runs/{rid}/artefacts/**"]))
    api.upload_folder(folder_path=got / "runs", path_in_repo="runs", repo_id=other, repo_type="dataset")
    api.delete_file(f"runs/{rid}/{rid}.json", repo_id=other, repo_type="dataset")  # the record is deleted

    reports = tmp_path / "gate_reports"
    fetch = covtoken("fetch", "--allow-unproven-prereg", "--all", "--results-repo", other, "--results", str(reports),
                     "--no-card", cwd=snapshot)
    assert fetch.rc == 1 and f"run {rid}: no record in {other}" in fetch.err, fetch.text
    (entry,) = read_ledger(reports)
    (job,) = jobs_of(hub, rid)
    local_keys = {"event", "run_id", "gate_id", "entry", "time", "commit", "calibration", "command_sha256"}
    assert local_keys <= set(entry) and entry["event"] == "start" and entry["gate_id"] == "G1"
    assert entry["job_id"] == job.id and entry["commit"] == head(snapshot) and entry["calibration"] is False
    audit = covtoken("audit", str(reports), cwd=snapshot)
    assert audit.rc != 0, audit.text
    assert f"run {rid} (G1, started {entry['time']}) has no record (killed, failed or deleted)" in audit.text
    # fetching again adds nothing (one run, one start entry)
    again = covtoken("fetch", "--allow-unproven-prereg", "--all", "--results-repo", other, "--results",
                     str(reports), "--no-card", cwd=snapshot)
    assert again.rc == 1 and read_ledger(reports) == [entry]
    # the same run with its record still there: fetched, its start entry present, the audit clean
    full = tmp_path / "full"
    ok = covtoken("fetch", "--allow-unproven-prereg", rid, "--results-repo", repo, "--results", str(full), "--no-card",
                  cwd=snapshot)
    assert ok.rc == 0, ok.text
    assert [e["event"] for e in read_ledger(full)] == ["start"] and (full / f"{rid}.json").is_file()


def test_cancel(hub: HubEmulator, fake_token: str, snapshot: Path, repo: str) -> None:
    sub = covtoken("submit", G1, "--results-repo", repo, "--timeout", "10m", "--yes", "--detach", "--log-every",
                   LOG_EVERY, "--", "--smoke", cwd=snapshot)
    assert sub.rc == 0, sub.text
    rid = sub.out.strip().splitlines()[-1]
    (job,) = jobs_of(hub, rid)
    wait_until(lambda: any("[covtoken-launch] running" in ln for ln in hub.job_logs(job.id)), 60, "job start")
    res = covtoken("cancel", rid, cwd=snapshot)
    assert res.rc == 0 and f"canceled job {job.id}" in res.err
    wait = covtoken("wait", rid, cwd=snapshot)
    assert wait.rc == 1 and "ended CANCELED" in wait.err and f"No record was written for run {rid}" in wait.err
    assert covtoken("cancel", rid, cwd=snapshot).err.count("no live job") == 1
    assert not HfApi().file_exists(repo, f"runs/{rid}/{rid}.json", repo_type="dataset")


def test_job_error_gives_a_clear_message_and_no_record(hub: HubEmulator, fake_token: str, snapshot: Path,
                                                        repo: str, tmp_path: Path) -> None:
    # in the foreground: submit streams the log, waits, explains, and fetches nothing
    sub = covtoken("submit", G1, "--results-repo", repo, "--timeout", "10m", "--yes", "--log-every", LOG_EVERY,
                   "--results", str(tmp_path / "gate_reports"), "--", "--backbone", "no-such-backbone", cwd=snapshot)
    assert sub.rc == 1
    rid = re.search(r"run (g1-[0-9a-z-]+) attempt 0: job", sub.err).group(1)
    # the streamed log: the job's one-line user error (exit 2) naming the flag and the value, no traceback
    assert "error: --backbone: " in sub.out and "no-such-backbone" in sub.out and "Traceback" not in sub.out
    assert "ended ERROR: Job failed with exit code: 2" in sub.err and f"No record was written for run {rid}" in sub.err
    wait = covtoken("wait", rid, cwd=snapshot)
    assert wait.rc == 1
    assert "ended ERROR: Job failed with exit code: 2" in wait.err and "no-such-backbone" in wait.err
    assert f"No record was written for run {rid}" in wait.err
    reports = tmp_path / "gate_reports"
    fetch = covtoken("fetch", "--allow-unproven-prereg", rid, "--results", str(reports), "--no-card", cwd=snapshot)
    assert fetch.rc == 1 and f"run {rid}: no record in {repo}" in fetch.err and "is ERROR" in fetch.err
    assert not (reports / f"{rid}.json").exists()
    # the job's exit status 2 (a user error before the compute) enters the ledger as a refusal, as locally
    from covtoken.runstore import read_ledger
    assert [e["event"] for e in read_ledger(reports)] == ["start", "refused"]
    assert f"run {rid}" not in covtoken("audit", str(reports), cwd=snapshot).text  # refused: never a missing result
    api = HfApi()
    files = api.list_repo_files(repo, repo_type="dataset")
    assert f"runs/{rid}/{rid}.json" not in files
    log = Path(api.hf_hub_download(repo, f"runs/{rid}/logs/attempt-0.log", repo_type="dataset")).read_text()
    assert "no-such-backbone" in log and "exited with code 2" in log  # the log still left the container




def test_attempts_2_resumes_a_killed_attempt_to_the_same_decision(hub: HubEmulator, roundtrip, snapshot: Path,
                                                                  repo: str, monkeypatch, tmp_path: Path) -> None:
    """--attempts 2: the Hub itself reruns the job after its first attempt dies (SIGKILL right after the commit
    of shard 1); the rerun, on a fresh disk, restores the committed shards and computes only the rest."""
    killed: dict[str, str] = {}
    original = hub.store.commit

    def commit_then_kill(rtype, repo_id, branch, title, message, ops, parent, create_branch=False):  # noqa: ANN001
        sha = original(rtype, repo_id, branch, title, message, ops, parent, create_branch)
        hit = [p for _, p, _ in ops if "/bank/" in p and "/shard-00001/" in p]
        if hit and not killed:
            (job,) = jobs_of(hub, hit[0].split("/")[1])
            killed[job.id] = hit[0]
            hub.kill_attempt(job.id)  # the process dies; the job has an attempt left
        return sha

    monkeypatch.setattr(hub.store, "commit", commit_then_kill)
    sub = covtoken("submit", G1, "--results-repo", repo, "--timeout", "10m", "--attempts", "2", "--yes", "--detach",
                   "--commit-every", "0", "--", "--smoke", cwd=snapshot)
    assert sub.rc == 0, sub.text
    assert "x 2 attempts" in sub.err  # the worst case counts both attempts
    rid = sub.out.strip().splitlines()[-1]
    wait = covtoken("wait", rid, "--timeout", "10m", cwd=snapshot)
    monkeypatch.setattr(hub.store, "commit", original)
    (job,) = jobs_of(hub, rid)  # one job: the Hub retried it, nobody resubmitted
    assert killed and job.id in killed
    assert job.spec["attempts"] == 2 and wait.rc == 0, wait.text
    first, second = attempt_logs(hub, job.id)
    assert [e["shard"] for e in log_events(first, "shard_done")][:2] == ["00000", "00001"]
    restored = log_events(second, "bank_restored")
    assert len(restored) == 1 and restored[0]["shards"] == 2, second
    assert [e["shard"] for e in log_events(second, "shard_done")] == ["00002", "00003"]  # only the missing ones

    reports = tmp_path / "gate_reports"
    fetch = covtoken("fetch", "--allow-unproven-prereg", rid, "--results", str(reports), "--no-card", cwd=snapshot)
    assert fetch.rc == 0, fetch.text
    rec = json.loads((reports / f"{rid}.json").read_text())
    whole = json.loads((roundtrip["reports"] / f"{roundtrip['run_id']}.json").read_text())
    assert rec["decision"] == whole["decision"] and rec["metrics"] == whole["metrics"]
    assert rec["criteria"] == whole["criteria"]
    assert rec["provenance"]["backend"]["job_id"] == job.id and rec["provenance"]["backend"]["attempts_allowed"] == 2
    assert any("2 token-bank shard(s)" in n and "restored" in n for n in rec["notes"])
    # one log per try, none overwritten: try 0's log (committed with its shards) and the retry's, and a claim each
    assert rec["provenance"]["backend"]["try"] == 1
    api = HfApi()
    log0 = Path(api.hf_hub_download(repo, f"runs/{rid}/logs/attempt-0.log", repo_type="dataset")).read_text()
    log1 = Path(api.hf_hub_download(repo, f"runs/{rid}/logs/attempt-0.try-1.log", repo_type="dataset")).read_text()
    done0 = [e["shard"] for e in log_events(log0.splitlines(), "shard_done")]  # as far as the last commit carried it
    assert done0 and done0 == ["00000", "00001"][:len(done0)], done0
    assert [e["shards"] for e in log_events(log0.splitlines(), "bank_restored")] == [0] and "attempt 0 try 0" in log0
    assert log_events(log1.splitlines(), "bank_restored")[0]["shards"] == 2 and "record_uploaded" in log1
    files = set(api.list_repo_files(repo, repo_type="dataset"))
    assert {f"runs/{rid}/tries/attempt-0.try-0.json", f"runs/{rid}/tries/attempt-0.try-1.json"} <= files


def test_429_storm_the_run_completes_with_every_shard(hub: HubEmulator, fake_token: str, snapshot: Path,
                                                      tmp_path: Path) -> None:
    """The emulator answers 429 with Retry-After to a second commit within 5 s, for submit and job alike:
    the run still completes, with all four shards and its record (the original backend died on the first 429)."""
    repo = new_repo()
    n0 = len(hub.rate_limited)
    hub.limit_commits(1, window_s=5.0, retry_after_s=1.0)
    try:
        sub = covtoken("submit", G1, "--results-repo", repo, "--timeout", "10m", "--yes", "--detach",
                       "--commit-every", "0", "--", "--smoke", cwd=snapshot)
        assert sub.rc == 0, sub.text
        rid = sub.out.strip().splitlines()[-1]
        wait = covtoken("wait", rid, "--timeout", "10m", cwd=snapshot)
    finally:
        hub.limit_commits(None)
    assert wait.rc == 0, wait.text
    storm = [r for r in hub.rate_limited[n0:] if r == f"dataset/{repo}"]
    assert storm, "the emulator never answered 429: the test did not test anything"
    (job,) = jobs_of(hub, rid)
    retries = log_events(hub.job_logs(job.id), "hub_retry")
    assert retries and all(r["status"] == 429 and r["retry_after"] for r in retries)
    files = set(HfApi().list_repo_files(repo, repo_type="dataset"))
    shards = sorted({f.split("/")[-2] for f in files if f.startswith(f"runs/{rid}/bank/") and "/shard-" in f})
    assert shards == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    assert f"runs/{rid}/{rid}.json" in files
    print(f"429 storm: {len(storm)} commit(s) answered 429, {len(retries)} retried inside the job; run complete")
