"""Drive the local Hub emulator with the real, unmodified huggingface_hub and datasets clients.

Everything goes over HTTP to 127.0.0.1 (HF_ENDPOINT set by conftest.py); jobs run as local subprocesses.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, HfFileSystem, Volume, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_emulator import HubEmulator, hub  # noqa: F401  (fixture)

NS = "testuser"
TOKEN = os.environ["HF_TOKEN"]
POLL = 0.2

JOB_SCRIPT = '''\
import json, os, sys
from pathlib import Path
from huggingface_hub import HfApi

print("bundle {version} args=" + " ".join(sys.argv[1:]), flush=True)
here = Path(__file__).resolve().parent
try:
    (here / "scratch.txt").write_text("x")
    writable = True
except OSError:
    writable = False
cfg = json.loads(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
result = {{"run_id": os.environ["RUN_ID"], "cfg": cfg, "volume_writable": writable,
          "endpoint": os.environ["HF_ENDPOINT"]}}
HfApi().upload_file(path_or_fileobj=json.dumps(result).encode(),
                    path_in_repo=f"runs/{{os.environ['RUN_ID']}}/result.json",
                    repo_id=os.environ["RESULTS_REPO"], repo_type="dataset", commit_message="job result")
print("uploaded result", flush=True)
'''


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _raw(hub: HubEmulator, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
    """One request with http.client (optionally on a reused keep-alive connection)."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_repo_roundtrip_pinned_revisions(hub: HubEmulator, tmp_path: Path) -> None:
    api, repo = HfApi(), f"{NS}/model-{_uid()}"
    url = api.create_repo(repo)
    assert url.repo_id == repo
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(repo)
    assert exc.value.response.status_code == 409
    api.create_repo(repo, exist_ok=True)

    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("version 1")
    (src / "sub" / "b.txt").write_text("bbb")
    (src / "sub" / "deep" / "c.bin").write_bytes(bytes(range(256)) * 4)
    c1 = api.upload_folder(folder_path=src, repo_id=repo)
    c2 = api.upload_file(path_or_fileobj=b"version 2", path_in_repo="a.txt", repo_id=repo)
    c3 = api.delete_file("sub/b.txt", repo_id=repo)
    shas = [c1.oid, c2.oid, c3.oid]
    assert len(set(shas)) == 3 and all(len(s) == 40 and int(s, 16) >= 0 for s in shas)

    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "a.txt", "sub/deep/c.bin"]
    assert sorted(api.list_repo_files(repo, revision=c1.oid)) == [".gitattributes", "a.txt", "sub/b.txt",
                                                                   "sub/deep/c.bin"]
    assert api.repo_info(repo).sha == c3.oid
    assert api.repo_info(repo, revision=c1.oid).sha == c1.oid
    assert [e.path for e in api.list_repo_tree(repo, path_in_repo="sub", revision=c1.oid)] == ["sub/deep", "sub/b.txt"]
    assert [c.commit_id for c in api.list_repo_commits(repo)][:3] == [c3.oid, c2.oid, c1.oid]

    cache = tmp_path / "cache"
    assert Path(hf_hub_download(repo, "a.txt", cache_dir=cache)).read_text() == "version 2"
    assert Path(hf_hub_download(repo, "a.txt", revision=c1.oid, cache_dir=cache)).read_text() == "version 1"
    snap = Path(snapshot_download(repo, revision=c1.oid, cache_dir=cache))
    assert (snap / "a.txt").read_text() == "version 1" and (snap / "sub" / "b.txt").read_text() == "bbb"
    assert (snap / "sub" / "deep" / "c.bin").read_bytes() == bytes(range(256)) * 4

    fs = HfFileSystem()
    assert fs.read_text(f"{repo}@{c1.oid}/a.txt") == "version 1"
    with fs.open(f"{repo}/sub/deep/c.bin", "rb", block_size=16) as fh:  # ranged reads
        fh.seek(300)
        assert fh.read(4) == bytes([44, 45, 46, 47])
    assert sorted(fs.glob(f"{repo}/**/*.bin")) == [f"{repo}/sub/deep/c.bin"]

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(f"{NS}/does-not-exist-{_uid()}")


def test_http_details_keepalive_range_auth(hub: HubEmulator) -> None:
    api, repo = HfApi(), f"{NS}/raw-{_uid()}"
    api.create_repo(repo, repo_type="dataset")
    sha = api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="d/x.txt", repo_id=repo,
                          repo_type="dataset").oid
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    # a POST whose body must be drained, then more requests on the same keep-alive connection
    status, _, body = _raw(hub, "POST", "/api/validate-yaml", {"Content-Type": "application/json"},
                           json.dumps({"content": "x" * 5000, "repoType": "dataset"}).encode(), conn=conn)
    assert status == 200 and json.loads(body) == {"errors": [], "warnings": []}
    path = f"/datasets/{repo}/resolve/main/d/x.txt"
    status, headers, body = _raw(hub, "HEAD", path, conn=conn)
    assert status == 200 and body == b"" and headers["content-length"] == "10"
    assert headers["x-repo-commit"] == sha and headers["etag"].strip('"') and "date" in headers
    status, headers, body = _raw(hub, "GET", path, {"Range": "bytes=2-5"}, conn=conn)
    assert (status, body, headers["content-range"]) == (206, b"2345", "bytes 2-5/10")
    status, _, body = _raw(hub, "GET", path, {"Range": "bytes=-3"}, conn=conn)
    assert (status, body) == (206, b"789")
    status, headers, _ = _raw(hub, "GET", path, {"Range": "bytes=10-"}, conn=conn)
    assert status == 416 and headers["content-range"] == "bytes */10"
    status, headers, _ = _raw(hub, "GET", f"/datasets/{repo}/resolve/main/nope.txt", conn=conn)
    assert status == 404 and headers["x-error-code"] == "EntryNotFound" and headers["x-repo-commit"] == sha
    conn.close()

    for auth in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        status, _, _ = _raw(hub, "GET", "/api/whoami-v2", auth)
        assert status == 401
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token="hf_wrong").whoami()
    assert exc.value.response.status_code == 401
    assert HfApi().whoami()["name"] == NS


def test_load_dataset_parquet_and_imagefolder(hub: HubEmulator, tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # keep ~/.cache clean
    api = HfApi()
    repo = f"{NS}/parquet-{_uid()}"
    api.create_repo(repo, repo_type="dataset")
    src = tmp_path / "pq"
    (src / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"x": [1, 2, 3], "y": ["a", "b", "c"]}).to_parquet(str(src / "data" / "train-0.parquet"))
    api.upload_folder(folder_path=src, repo_id=repo, repo_type="dataset")
    ds = datasets.load_dataset(repo, cache_dir=str(tmp_path / "dcache"))
    assert ds["train"]["x"] == [1, 2, 3] and ds["train"]["y"] == ["a", "b", "c"]

    image_mod = pytest.importorskip("PIL.Image")
    repo_img = f"{NS}/images-{_uid()}"
    api.create_repo(repo_img, repo_type="dataset")
    img = tmp_path / "img" / "train"
    img.mkdir(parents=True)
    rows = []
    for i in range(3):
        image_mod.new("L", (4, 4), color=i * 60).save(img / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "label": i}))
    (img / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    api.upload_folder(folder_path=tmp_path / "img", repo_id=repo_img, repo_type="dataset")
    ds = datasets.load_dataset(repo_img, cache_dir=str(tmp_path / "dcache2"))
    assert ds["train"].num_rows == 3 and sorted(ds["train"]["label"]) == [0, 1, 2]
    assert ds["train"][0]["image"].size == (4, 4)


def test_job_runs_pinned_volume_and_uploads_back(hub: HubEmulator, tmp_path: Path) -> None:
    api, repo, run_id = HfApi(), f"{NS}/results-{_uid()}", f"r{_uid()}"
    api.create_repo(repo, repo_type="dataset", private=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "run.py").write_text(JOB_SCRIPT.format(version="v1"))
    (bundle / "cfg.json").write_text(json.dumps({"lr": 0.1}))
    pinned = api.upload_folder(folder_path=bundle, repo_id=repo, repo_type="dataset", path_in_repo="bundles/b1").oid
    api.upload_file(path_or_fileobj=JOB_SCRIPT.format(version="v2").encode(), path_in_repo="bundles/b1/run.py",
                    repo_id=repo, repo_type="dataset")  # newer content the pinned job must not see

    job = api.run_job(image="ghcr.io/astral-sh/uv:python3.12-bookworm",
                      command=["uv", "run", "/code/run.py", "--config", "/code/cfg.json"],
                      env={"RUN_ID": run_id, "RESULTS_REPO": repo}, secrets={"HF_TOKEN": TOKEN}, timeout=120,
                      labels={"suite": "emu", "run": run_id}, namespace=NS,
                      volumes=[Volume(type="dataset", source=repo, mount_path="/code", revision=pinned,
                                      path="bundles/b1")])
    assert job.status.stage in ("SCHEDULING", "RUNNING") and job.secrets == {"HF_TOKEN": "<redacted>"}
    followed = list(api.fetch_job_logs(job_id=job.id, namespace=NS, follow=True))
    final = api.wait_for_job(job.id, namespace=NS, timeout=60, poll_interval=POLL)
    assert final.status.stage == "COMPLETED", hub.job_logs(job.id)
    assert final.started_at and final.finished_at and final.finished_at >= final.started_at
    assert followed[0].startswith("bundle v1 args=--config ") and followed[-1] == "uploaded result"
    assert "/code/" not in followed[0]  # mount path rewritten to the materialised volume
    assert list(api.fetch_job_logs(job_id=job.id, namespace=NS)) == followed == hub.job_logs(job.id)

    result = json.loads(Path(hf_hub_download(repo, f"runs/{run_id}/result.json", repo_type="dataset",
                                             cache_dir=tmp_path / "c")).read_text())
    assert result["cfg"] == {"lr": 0.1} and result["endpoint"] == hub.endpoint and result["run_id"] == run_id
    if os.geteuid() != 0:  # root ignores permission bits
        assert result["volume_writable"] is False

    info = api.inspect_job(job_id=job.id, namespace=NS)
    assert info.volumes[0].revision == pinned and info.volumes[0].path == "bundles/b1"
    assert info.labels["run"] == run_id and info.labels["name"].startswith("uv-python3-12-bookworm-")
    status, _, body = _raw(hub, "GET", f"/api/jobs/{NS}?label=run%3D{run_id}")
    assert status == 200 and TOKEN not in body.decode() and len(json.loads(body)) == 1
    assert TOKEN not in (hub.job_dir(job.id) / "spec.json").read_text()
    assert hub.job_secrets(job.id) == {"HF_TOKEN": TOKEN}
    status, _, body = _raw(hub, "GET", f"/api/jobs/{NS}/{job.id}/logs")
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
    assert events[0]["data"].startswith("===== Job started") and all(e["timestamp"].endswith("Z") for e in events)
    assert _raw(hub, "GET", f"/api/jobs/{NS}/{job.id}/metrics")[0] == 406


def test_job_failure_timeout_cancel_metrics(hub: HubEmulator) -> None:
    api = HfApi()
    img = "python:3.12"
    failing = api.run_job(image=img, command=["python", "-c", "import os, sys; print('token', os.environ.get("
                                                          "'HF_TOKEN')); sys.exit(3)"], namespace=NS)
    slow = api.run_job(image=img, command=["python", "-c", "import time\nwhile True:\n print('tick', flush=True)\n"
                                                           " time.sleep(0.2)"], timeout=1, namespace=NS)
    sleeper = api.run_job(image=img, command=["python", "-c", "import time; print('up', flush=True); "
                                                              "time.sleep(300)"], timeout="5m", namespace=NS)
    running = api.wait_for_job(sleeper.id, stages=["RUNNING"], namespace=NS, timeout=20, poll_interval=POLL)
    assert running.status.stage == "RUNNING"
    sample = list(api.fetch_job_metrics(job_id=sleeper.id, namespace=NS))
    assert len(sample) == 1 and sample[0]["memory_used_bytes"] > 0 and "cpu_usage_pct" in sample[0]
    api.cancel_job(job_id=sleeper.id, namespace=NS)

    done = {j.id: j for j in api.wait_for_job([failing.id, slow.id, sleeper.id], namespace=NS, timeout=30,
                                              poll_interval=POLL)}
    assert (done[failing.id].status.stage, done[failing.id].status.message) == ("ERROR", "Job failed with exit code: 3")
    assert hub.job_logs(failing.id) == ["token None"]  # the parent's HF_TOKEN does not leak without a secret
    assert done[slow.id].status.stage == "ERROR" and "timed out" in done[slow.id].status.message
    assert "tick" in hub.job_logs(slow.id)
    assert done[sleeper.id].status.stage == "CANCELED"
    assert hub.job_manager.jobs[sleeper.id].proc.poll() is not None
    assert list(api.fetch_job_metrics(job_id=sleeper.id, namespace=NS)) == []  # 406 after the end, tolerated


def test_list_labels_hardware_rerun_and_kill(hub: HubEmulator) -> None:
    api, tag = HfApi(), f"t{_uid()}"
    quick = api.run_job(image="python:3.12", command=["python", "-c", "print('hi')"], labels={"batch": tag},
                        namespace=NS)
    victim = api.run_job(image="python:3.12", command=["python", "-c", "import time; time.sleep(300)"],
                         labels={"batch": tag, "role": "victim"}, namespace=NS)
    api.wait_for_job(victim.id, stages=["RUNNING"], namespace=NS, timeout=20, poll_interval=POLL)
    killed = hub.kill_job(victim.id, message="node lost")
    assert killed["status"] == {"stage": "ERROR", "message": "node lost"}
    assert api.inspect_job(job_id=victim.id, namespace=NS).status.message == "node lost"
    assert api.wait_for_job(quick.id, namespace=NS, timeout=20, poll_interval=POLL).status.stage == "COMPLETED"

    assert {j.id for j in api.list_jobs(labels={"batch": tag}, namespace=NS)} == {quick.id, victim.id}
    assert [j.id for j in api.list_jobs(labels={"batch": tag, "role": "victim"}, namespace=NS)] == [victim.id]
    assert [j.id for j in api.list_jobs(labels={"batch": tag}, status="ERROR", namespace=NS)] == [victim.id]
    api.update_job_labels(job_id=quick.id, labels={"batch": tag, "role": "relabelled"}, namespace=NS)
    assert [j.id for j in api.list_jobs(labels={"role": "relabelled"}, namespace=NS)] == [quick.id]
    with pytest.raises(BadRequestError):
        api.run_job(image="python:3.12", command=["true"], labels={"version": "v1.2"}, namespace=NS)

    again = api.rerun_job(job_id=quick.id, namespace=NS)
    assert again.id != quick.id and again.initiator.type == "duplicated-job" and again.command == quick.command
    assert api.wait_for_job(again.id, namespace=NS, timeout=20, poll_interval=POLL).status.stage == "COMPLETED"
    assert hub.job_logs(again.id) == ["hi"]

    hardware = {h.name: h for h in api.list_jobs_hardware()}
    assert len(hardware) == 26 and hardware["cpu-basic"].unit_cost_micro_usd == 167
    assert hardware["cpu-upgrade"].unit_cost_micro_usd == 500 and hardware["t4-small"].accelerator.model == "T4"
    assert hardware["h200"].accelerator.vram == "141 GB" and hardware["a100-large"].unit_label == "minute"


def test_keepalive_live_follow_and_persistence(tmp_path: Path) -> None:
    """A private emulator (no token, fast keep-alive) on another port: live SSE and restart on the same root."""
    port = _free_port()
    with HubEmulator(tmp_path / "hub", port, keepalive_s=0.3, scheduling_delay_s=0.0) as emu:
        api = HfApi(endpoint=emu.endpoint, token="anything")
        api.create_repo(f"{NS}/persist")
        sha = api.upload_file(path_or_fileobj=b"kept", path_in_repo="k.txt", repo_id=f"{NS}/persist").oid
        job = api.run_job(image="python:3.12", namespace=NS, command=[
            "python", "-c", "import time\nfor i in range(3):\n print('line', i, flush=True); time.sleep(0.4)\n"
                            "time.sleep(1.0)\nprint('end', flush=True)"])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/api/jobs/{NS}/{job.id}/logs")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        seen, t0 = [], time.monotonic()
        for raw_line in io.TextIOWrapper(resp, encoding="utf-8"):
            seen.append(raw_line.rstrip("\n"))
        assert time.monotonic() - t0 > 1.5  # the stream stayed open while the job ran, then ended
        assert ": keep-alive" in seen
        data = [json.loads(s[6:])["data"] for s in seen if s.startswith("data: ")]
        assert data[1:] == ["line 0", "line 1", "line 2", "end"]
        assert list(api.fetch_job_logs(job_id=job.id, namespace=NS, follow=True)) == data[1:]
    with HubEmulator(tmp_path / "hub", port) as emu2:
        api = HfApi(endpoint=emu2.endpoint, token="anything")
        assert api.repo_info(f"{NS}/persist").sha == sha
        assert api.list_repo_files(f"{NS}/persist") == [".gitattributes", "k.txt"]
