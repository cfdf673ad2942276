"""Bounded, retried commits (issue 11): retries honour Retry-After, the batcher makes at most one commit per
interval and loses nothing, a 429 storm from the Hub emulator (real client) still lands every shard, and the
sweep's commit interval keeps a sweep under its hourly budget."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from covtoken.hfjobs.hubsync import CommitBatcher, HubSync, JobEnv
from covtoken.hfjobs.retry import retry_after_s, with_retry
from covtoken.hfjobs.sweep import COMMIT_BUDGET_PER_HOUR, sweep_commit_every
from hfjobs_support import NS, fake_token, hf_cache, new_repo  # noqa: F401
from hub_emulator import HubEmulator, hub  # noqa: F401  (fixture)


class _Resp:
    def __init__(self, status: int, headers: dict | None = None) -> None:
        self.status_code, self.headers = status, headers or {}


class _HTTPError(Exception):
    def __init__(self, status: int, headers: dict | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.response = _Resp(status, headers)


def _flaky(errors: list[Exception], result: str = "ok"):  # noqa: ANN202
    calls = []

    def fn() -> str:
        calls.append(time.monotonic())
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


def test_retry_honours_retry_after_and_backs_off() -> None:
    waits: list[float] = []
    fn, calls = _flaky([_HTTPError(429, {"Retry-After": "7"}), _HTTPError(503), _HTTPError(502)])
    assert with_retry(fn, what="x", sleep=waits.append, base_s=2.0) == "ok" and len(calls) == 4
    assert waits[0] == 7.0  # the server's Retry-After, not the backoff
    assert 1.0 <= waits[1] <= 4.0 and 2.0 <= waits[2] <= 8.0  # exponential backoff with jitter (2 s, then 4 s)
    # an HTTP-date Retry-After, 30 s in the future
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_s(_HTTPError(429, {"Retry-After": date})) <= 31
    # not retried: a 4xx other than 429, and anything without a response
    for err in (_HTTPError(404), _HTTPError(403), ValueError("bad")):
        fn, calls = _flaky([err])
        with pytest.raises(type(err)):
            with_retry(fn, what="x", sleep=waits.append)
        assert len(calls) == 1
    # gives up after `tries`, and before exceeding max_total_s
    fn, calls = _flaky([_HTTPError(429)] * 5)
    with pytest.raises(_HTTPError):
        with_retry(fn, what="x", tries=3, sleep=lambda s: None)
    assert len(calls) == 3
    fn, calls = _flaky([_HTTPError(429, {"Retry-After": "100"})] * 5)
    with pytest.raises(_HTTPError):
        with_retry(fn, what="x", max_total_s=150, sleep=lambda s: None)
    assert len(calls) == 2


def _op(path: str) -> CommitOperationAdd:
    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=path.encode())


def test_batcher_commits_at_most_once_per_interval_and_loses_nothing() -> None:
    """One simulated hour, a shard every 36 s, a 300 s interval: <= 13 commits, every shard committed, each
    commit carries the log, and no shard waits more than one interval."""
    now = [0.0]
    commits: list[tuple[float, list[str]]] = []
    b = CommitBatcher(lambda ops, msg: commits.append((now[0], [o.path_in_repo for o in ops])) or "oid", 300,
                      extra=lambda: [_op("log")], clock=lambda: now[0])
    queued_at = {}
    for i in range(100):
        now[0] = i * 36.0
        queued_at[f"s{i}"] = now[0]
        b.add([_op(f"s{i}")], f"shard {i}")
    rest = [o.path_in_repo for o in b.flush()]
    assert len(commits) <= 3600 / 300 + 1, len(commits)
    times = [t for t, _ in commits]
    assert all(b - a >= 300 for a, b in zip(times, times[1:]))  # at most one commit per interval
    committed = {p: t for t, paths in commits for p in paths}
    assert set(committed) | set(rest) == {f"s{i}" for i in range(100)} | {"log"}
    assert all("log" in paths for _, paths in commits)
    assert max(committed[s] - queued_at[s] for s in committed if s != "log") <= 300 + 36  # one interval + a shard
    assert len(rest) <= 300 / 36 + 1  # what a kill right now would lose: the shards of one interval


def test_sweep_interval_keeps_the_repo_under_budget() -> None:
    for cells in (1, 3, 20, 64, 100, 500):
        every = sweep_commit_every(cells, 300)
        assert every >= 300 and cells * 3600 / every <= COMMIT_BUDGET_PER_HOUR, (cells, every)
    assert COMMIT_BUDGET_PER_HOUR <= 128 // 2  # well under the Hub's quoted 128 per hour


def test_429_storm_every_shard_lands(hub: HubEmulator, fake_token: str, tmp_path: Path) -> None:
    """The emulator answers 429 (Retry-After) after 2 commits per second: the run's shards all land anyway."""
    api = HfApi()
    repo = new_repo()
    api.create_repo(repo, repo_type="dataset", private=True)
    env = JobEnv(run_id="g1-20260101t000000-storm1", results_repo=repo, namespace=NS, attempt=0, timeout_s=None,
                 commit_every_s=0.0, kit_dir=None)
    sync = HubSync(env, api=api)
    bank = tmp_path / "bank-x"
    bank.mkdir()
    on_shard = sync.bank_uploader(bank)
    hub.limit_commits(2, window_s=1.0, retry_after_s=0.3)
    try:
        # the attack first: without retries, the real client meets the 429 and the commit is lost
        api.create_commit(repo_id=repo, repo_type="dataset", operations=[_op("a")], commit_message="a")
        api.create_commit(repo_id=repo, repo_type="dataset", operations=[_op("b")], commit_message="b")
        with pytest.raises(HfHubHTTPError) as err:
            api.create_commit(repo_id=repo, repo_type="dataset", operations=[_op("c")], commit_message="c")
        assert err.value.response.status_code == 429 and err.value.response.headers["Retry-After"] == "0.3"
        n0 = len(hub.rate_limited)
        for i in range(6):
            sdir = bank / f"shard-{i:05d}"
            sdir.mkdir()
            (sdir / "block-00.npy").write_bytes(bytes([i]) * 64)
            (bank / "manifest.json").write_text(json.dumps({"shards": {f"{j:05d}": {} for j in range(i + 1)}}))
            on_shard(sdir)
        (tmp_path / "done.json").write_text("{}")
        sync.publish_file(tmp_path / "done.json", "done.json")
    finally:
        hub.limit_commits(None)
    assert len(hub.rate_limited) > n0  # the storm did happen
    files = set(api.list_repo_files(repo, repo_type="dataset"))
    assert {f"runs/{env.run_id}/bank/bank-x/shard-{i:05d}/block-00.npy" for i in range(6)} <= files
    assert f"runs/{env.run_id}/done.json" in files
    manifest = json.loads(Path(api.hf_hub_download(repo, f"runs/{env.run_id}/bank/bank-x/manifest.json",
                                                   repo_type="dataset")).read_text())
    assert len(manifest["shards"]) == 6


def test_sigterm_commits_the_pending_shards_before_exiting(tmp_path: Path) -> None:
    """A cancel, a timeout or a graceful preemption sends SIGTERM: the shards waiting for their interval are
    committed first, so a stop loses nothing that was finished."""
    import os
    import signal

    class _Api:
        def __init__(self) -> None:
            self.commits: list[list[str]] = []

        def create_commit(self, *, operations, **_kw):  # noqa: ANN001, ANN003, ANN201
            self.commits.append([o.path_in_repo for o in operations])
            return type("Info", (), {"oid": "0" * 40})()

    api = _Api()
    env = JobEnv(run_id="g1-20260101t000000-sigter", results_repo=f"{NS}/r", namespace=NS, attempt=0,
                 timeout_s=None, commit_every_s=3600.0, kit_dir=None)
    sync = HubSync(env, api=api)
    bank = tmp_path / "bank-y"
    (bank / "shard-00000").mkdir(parents=True)
    (bank / "shard-00000" / "block-00.npy").write_bytes(b"x")
    (bank / "manifest.json").write_text("{}")
    sync.bank_uploader(bank)(bank / "shard-00000")
    assert api.commits == []  # waiting for its interval
    previous = sync.flush_on_sigterm()
    try:
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 143
    assert api.commits == [[f"runs/{env.run_id}/bank/bank-y/shard-00000/block-00.npy",
                            f"runs/{env.run_id}/bank/bank-y/manifest.json"]]
