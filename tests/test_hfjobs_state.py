"""The state bucket (``covtoken submit --bucket NS/NAME``) and one log per Hub try.

With a read-write bucket volume mounted at /state, token-bank shards are written there as they are made, so a
hard kill (SIGKILL) loses at most the shard in flight, and the Hub's retry (``--attempts 2``) reads them back and
ends with the decision and metrics of an unbroken run. Each try of an attempt uploads its log under its own name.
The emulator keeps a bucket as a plain folder that outlives the job's containers, as the Hub does.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi

from covtoken.hfjobs.errors import HFJobsError
from covtoken.hfjobs.hubsync import HubSync, JobEnv, log_path, try_path
from covtoken.hfjobs.launcher import STATE_FLAG as LAUNCHER_STATE_FLAG
from covtoken.hfjobs.launcher import LaunchError, split_state
from covtoken.hfjobs.spec import STATE_FLAG, STATE_MOUNT, make_request, parse_bucket
from covtoken.record import sha256_file

from hfjobs_support import (G1, NS, attempt_logs, covtoken, fake_token, hf_cache, hf_cli, jobs_of,  # noqa: F401
                            log_events, new_repo, snapshot)
from hub_emulator import HubEmulator, hub  # noqa: F401  (fixture)


def new_bucket() -> str:
    return f"{NS}/covtoken-state-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------------------ offline units
def test_bucket_ids_and_the_request() -> None:
    assert parse_bucket("org/state") == parse_bucket("hf://buckets/org/state") == "org/state"
    for bad in ("state", "org/", "/state", "org/a/b", "hf://datasets/org/state", "org/../x", "org/sta te"):
        with pytest.raises(HFJobsError, match="--bucket"):
            parse_bucket(bad)
    assert LAUNCHER_STATE_FLAG == STATE_FLAG  # the stdlib launcher spells the flag itself
    kw = dict(run_id="g1-x", attempt=0, namespace="org", results_repo="org/r", job=G1, job_args=["--smoke"],
              commit="a" * 40, image="img")
    plain = make_request(**kw)
    assert plain.command == ["python", "/code/launch.py", "--smoke"] and len(plain.volumes("rev")) == 1
    assert "COVTOKEN_STATE_BUCKET" not in plain.env
    jr = make_request(**kw, bucket="hf://buckets/org/state")
    assert jr.command == ["python", "/code/launch.py", STATE_FLAG, STATE_MOUNT, "--smoke"]
    assert jr.env["COVTOKEN_STATE_BUCKET"] == "org/state"
    assert jr.spec("rev")["volumes"][1] == {"type": "bucket", "source": "org/state", "mountPath": STATE_MOUNT}
    assert f"-v hf://buckets/org/state:{STATE_MOUNT} " in shlex.join(jr.hf_command("rev"))
    with pytest.raises(HFJobsError, match="COVTOKEN_STATE_BUCKET"):
        make_request(**kw, env={"COVTOKEN_STATE_BUCKET": "x/y"})


def test_launcher_takes_the_state_flag_only_in_front() -> None:
    assert split_state([STATE_FLAG, "/state", "--smoke"]) == (Path("/state"), ["--smoke"])
    assert split_state(["--smoke", STATE_FLAG, "/state"]) == (None, ["--smoke", STATE_FLAG, "/state"])
    with pytest.raises(LaunchError, match=STATE_FLAG):
        split_state([STATE_FLAG])


def _bank(root: Path, n: int) -> Path:
    """A token-bank-shaped folder with ``n`` finished shards and its manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards = {}
    for s in range(n):
        d = root / f"shard-{s:05d}"
        d.mkdir(exist_ok=True)
        (d / "block-00.npy").write_bytes(bytes([s]) * (100 + s))
        shards[f"{s:05d}"] = {"start": s, "stop": s + 1, "files": {"block-00.npy": sha256_file(d / "block-00.npy")}}
    (root / "manifest.json").write_text(json.dumps({"identity": {"x": 1}, "shards": shards, "complete": False}))
    return root


def _sync(state: Path, attempt: int = 0) -> HubSync:
    env = JobEnv(run_id="g1-x", results_repo="o/r", namespace="o", attempt=attempt, timeout_s=None,
                 commit_every_s=300.0, kit_dir=None, state_dir=state, state_bucket="o/state")
    return HubSync(env, api=object())


def test_shards_go_to_the_bucket_as_made_and_come_back(tmp_path: Path) -> None:
    state = tmp_path / "bucket"
    state.mkdir()
    sync = _sync(state)
    bank = tmp_path / "a" / "bank-1"
    save = sync.bank_uploader(bank)
    for n in (1, 2, 3):  # each shard is in the bucket before the next is made
        _bank(bank, n)
        save(bank / f"shard-{n - 1:05d}")
        assert (state / "runs/g1-x/bank/bank-1" / f"shard-{n - 1:05d}" / "block-00.npy").is_file()
    versions = sorted((state / "runs/g1-x/bank/bank-1/manifests").glob("*.json"))
    assert len(versions) == 2 and len(json.loads(versions[-1].read_text())["shards"]) == 3  # newest two kept

    back = tmp_path / "b" / "bank-1"
    assert _sync(state, attempt=1).restore_bank(back) == 3
    for s in range(3):
        assert (back / f"shard-{s:05d}/block-00.npy").read_bytes() == (bank / f"shard-{s:05d}/block-00.npy").read_bytes()
    assert json.loads((back / "manifest.json").read_text()) == json.loads((bank / "manifest.json").read_text())

    # a newest version torn by a kill is skipped: the previous complete one lists one shard fewer
    versions[-1].write_text('{"identity": {"x": 1}, "shards": {"00')
    assert _sync(state).restore_bank(tmp_path / "c" / "bank-1") == 2
    # a shard whose bytes do not match the manifest is not counted as restored (the bank rebuilds it)
    (state / "runs/g1-x/bank/bank-1/shard-00001/block-00.npy").write_bytes(b"torn")
    assert _sync(state).restore_bank(tmp_path / "d" / "bank-1") == 1
    # nothing in the bucket for another bank: nothing restored
    assert _sync(state).restore_bank(tmp_path / "e" / "bank-2") == 0


def test_per_try_names() -> None:
    assert log_path("r", 0) == log_path("r", 0, 0) == "runs/r/logs/attempt-0.log"
    assert log_path("r", 0, 1) == "runs/r/logs/attempt-0.try-1.log" != log_path("r", 1, 0)
    assert try_path("r", 2, 1) == "runs/r/tries/attempt-2.try-1.json"


# ------------------------------------------------------------------------------------------------ with the emulator
def test_emulated_bucket_outlives_the_attempts_that_mount_it(hub: HubEmulator, fake_token: str) -> None:
    """The emulator's bucket volume: read-write, the same folder for every attempt (a repo volume is a fresh
    read-only copy each time), and a missing bucket fails the mount."""
    from huggingface_hub import Volume

    api, bucket = HfApi(), new_bucket()
    api.create_bucket(bucket, private=True)
    count = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]) / 'n'; n = int(p.read_text()) if p.exists() else 0; "
             "p.write_text(str(n + 1)); print('seen', n); sys.exit(0 if n else 1)")
    job = api.run_job(image="img", command=["python", "-c", count, STATE_MOUNT], attempts=2, namespace=NS,
                      volumes=[Volume(type="bucket", source=bucket, mount_path=STATE_MOUNT)])
    assert hub.wait_job(job.id, 60)["status"]["stage"] == "COMPLETED"  # the second attempt saw the first's write
    assert [ln for ln in hub.job_logs(job.id) if ln.startswith("seen")] == ["seen 0", "seen 1"]
    assert (hub.bucket_dir(bucket) / "n").read_text() == "2"
    gone = api.run_job(image="img", command=["python", "-c", "pass"], namespace=NS,
                       volumes=[Volume(type="bucket", source=f"{NS}/no-such-bucket", mount_path=STATE_MOUNT)])
    end = hub.wait_job(gone.id, 60)["status"]
    assert end["stage"] == "ERROR" and "Failed to mount volume" in end["message"]


def test_bucket_dry_run_pastes_into_the_real_cli(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    """The dry run prints `hf buckets create` and `-v hf://buckets/NS/NAME:/state`; pasted into the real `hf`
    CLI, the emulator receives the printed spec, bucket volume included."""
    repo, bucket = new_repo(), new_bucket()
    res = covtoken("submit", G1, "--results-repo", repo, "--bucket", bucket, "--dry-run", "--namespace", NS, "--",
                   "--smoke", cwd=snapshot)
    assert res.rc == 0, res.text
    assert f"state       hf://buckets/{bucket} mounted read-write at /state" in res.err
    lines = res.out.splitlines()
    create = shlex.split(next(ln for ln in lines if ln.startswith("hf buckets create ")))
    upload = shlex.split(next(ln for ln in lines if ln.startswith("hf upload ")))
    run = shlex.split(next(ln for ln in lines if ln.startswith("hf jobs run ")))
    assert f"hf://buckets/{bucket}:{STATE_MOUNT}" in run and "--private" in create
    spec = json.loads(res.out[res.out.index("{"):])
    rid = spec["environment"]["COVTOKEN_RUN_ID"]
    assert spec["command"] == ["python", "/code/launch.py", STATE_FLAG, STATE_MOUNT, "--smoke"]
    assert spec["volumes"][1] == {"type": "bucket", "source": bucket, "mountPath": STATE_MOUNT}
    HfApi().create_repo(repo, repo_type="dataset", private=True)
    for cmd in (create, upload, run):
        r = subprocess.run([*hf_cli(), *cmd[1:]], capture_output=True, text=True, cwd=snapshot, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    assert HfApi().bucket_info(bucket).private is True
    (job,) = jobs_of(hub, rid)
    HfApi().cancel_job(job_id=job.id, namespace=NS)
    sent = dict(job.spec)
    sent.pop("secrets"), spec.pop("secrets")
    for s in (spec, sent):
        s["volumes"] = [{k: v for k, v in vol.items() if k != "revision"} for vol in s["volumes"]]
    assert sent == spec


def test_a_public_bucket_is_refused(hub: HubEmulator, fake_token: str, snapshot: Path) -> None:
    bucket = new_bucket()
    HfApi().create_bucket(bucket, private=False)
    res = covtoken("submit", G1, "--results-repo", new_repo(), "--bucket", bucket, "--yes", "--detach", "--",
                   "--smoke", cwd=snapshot)
    assert res.rc == 2 and f"bucket {bucket} is public" in res.err and res.err.count("\n") == 1, res.text
    assert "--public" in res.err
    bad = covtoken("submit", G1, "--results-repo", new_repo(), "--bucket", "no-slash", "--dry-run", "--", "--smoke",
                   cwd=snapshot)
    assert bad.rc == 2 and "--bucket 'no-slash'" in bad.err




def _saved_shards(folder: Path) -> int:
    """Shards the newest readable manifest version in a bucket bank folder lists (0 when none)."""
    for v in sorted(folder.glob("*/manifests/*.json"), reverse=True):
        try:
            return len(json.loads(v.read_text())["shards"])
        except (OSError, ValueError, KeyError):
            continue
    return 0


def _fetch(rid: str, snapshot: Path, dest: Path) -> dict[str, Any]:
    res = covtoken("fetch", "--allow-unproven-prereg", rid, "--results", str(dest), "--no-card", cwd=snapshot)
    assert res.rc == 0, res.text
    return json.loads((dest / f"{rid}.json").read_text())


@pytest.mark.slow
def test_hard_kill_with_a_bucket_loses_at_most_the_shard_in_flight(hub: HubEmulator, fake_token: str,
                                                                   snapshot: Path, tmp_path: Path) -> None:
    """An unbroken run and a run whose first try is SIGKILLed mid-extraction (after its second shard reached
    the bucket), both with a state bucket and the default commit interval (so the repo would have lost every
    shard): the Hub's retry reads the saved shards back, recomputes at most the one in flight, and ends with
    the unbroken run's decision and metrics; each try uploaded its own log."""
    repo, bucket = new_repo(), new_bucket()
    base = ["--results-repo", repo, "--bucket", bucket, "--timeout", "10m", "--yes", "--detach"]
    t0 = time.monotonic()
    sub = covtoken("submit", G1, *base, "--", "--smoke", cwd=snapshot)
    assert sub.rc == 0, sub.text
    whole_id = sub.out.strip().splitlines()[-1]
    assert covtoken("wait", whole_id, "--timeout", "10m", cwd=snapshot).rc == 0
    whole = _fetch(whole_id, snapshot, tmp_path / "whole")
    t_whole = time.monotonic() - t0

    sub = covtoken("submit", G1, *base, "--attempts", "2", "--", "--smoke", cwd=snapshot)
    assert sub.rc == 0, sub.text
    rid = sub.out.strip().splitlines()[-1]
    (job,) = jobs_of(hub, rid)
    banks = hub.bucket_dir(bucket) / "runs" / rid / "bank"
    killed: dict[str, int] = {}

    def kill_after_two_shards() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and job.stage not in ("COMPLETED", "ERROR", "CANCELED"):
            if _saved_shards(banks) >= 2:
                killed["saved"] = _saved_shards(banks)
                hub.kill_attempt(job.id)  # SIGKILL: no handler runs, nothing is flushed
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_after_two_shards, daemon=True)
    watcher.start()
    wait = covtoken("wait", rid, "--timeout", "10m", cwd=snapshot)
    watcher.join(timeout=5)
    assert killed, "the first try was never killed: the test did not test anything"
    assert wait.rc == 0, wait.text
    first, second = attempt_logs(hub, job.id)
    done_first = [e["shard"] for e in log_events(first, "shard_done")]
    saved_first = [e["shard"] for e in log_events(first, "shard_saved")]
    restored = log_events(second, "bank_restored")
    assert len(restored) == 1 and restored[0]["from"] == "bucket", second
    r = restored[0]["shards"]
    # everything the bucket held at the kill came back (the kill can land between a manifest version and its
    # log line, so the log may show one save fewer), and the kill came mid-extraction
    assert r >= killed["saved"] >= 2 and r >= len(saved_first) and r < 4, (done_first, saved_first, killed, r)
    assert len(done_first) - r <= 1, (done_first, r)  # lost at most the shard in flight
    assert [e["shard"] for e in log_events(second, "shard_done")] == [f"{s:05d}" for s in range(r, 4)]
    print(f"bucket: first try made {len(done_first)} shard(s), saved {len(saved_first)}, killed; the retry "
          f"restored {r} and computed {4 - r}; unbroken run {t_whole:.1f} s")

    st = covtoken("status", rid, cwd=snapshot)
    assert st.rc == 0 and f"kept in the bucket hf://buckets/{bucket}" in st.err, st.text
    rec = _fetch(rid, snapshot, tmp_path / "resumed")
    assert rec["decision"] == whole["decision"] and rec["metrics"] == whole["metrics"]
    assert rec["criteria"] == whole["criteria"]
    be = rec["provenance"]["backend"]
    assert be["state"] == {"bucket": bucket, "folder": f"runs/{rid}", "holds": "token-bank shards and checkpoints"}
    assert be["try"] == 1 and be["attempts_allowed"] == 2 and be["job_id"] == job.id
    assert any(f"{r} token-bank shard(s)" in n and "restored" in n for n in rec["notes"])

    api = HfApi()
    files = set(api.list_repo_files(repo, repo_type="dataset"))
    assert not [f for f in files if "/bank/" in f]  # shards went to the bucket, never into commits
    # one log per try, none overwritten: try 0's (uploaded when it claimed its try) and try 1's whole log
    log0 = Path(api.hf_hub_download(repo, log_path(rid, 0), repo_type="dataset")).read_text()
    log1 = Path(api.hf_hub_download(repo, log_path(rid, 0, 1), repo_type="dataset")).read_text()
    head0 = log0.splitlines()
    assert head0 and head0 == first[:len(head0)] and "bank_restored" not in log0  # the first try's own start
    assert "attempt 0 try 1" in log1 and "bank_restored" in log1 and "record_uploaded" in log1
    assert "attempt 0 try 0" in "\n".join(first)
    for k in (0, 1):
        claim = json.loads(Path(api.hf_hub_download(repo, try_path(rid, 0, k), repo_type="dataset")).read_text())
        assert claim["try"] == k and claim["job_id"] == job.id and claim["attempts_allowed"] == 2
        assert claim["image"] == claim["image_requested"] == job.spec["dockerImage"]
    assert log_path(whole_id, 0, 1) not in files and not [f for f in files if f.startswith(f"runs/{whole_id}/tries/")]
