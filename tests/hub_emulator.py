"""Local Hugging Face Hub emulator for the offline test suite (standard library only).

The real, unmodified `huggingface_hub` client (and `datasets`) talk to it through `HF_ENDPOINT`, which
tests/conftest.py points at `http://127.0.0.1:$COVTOKEN_TEST_HUB_PORT` before anything imports them.

Served (see ../shared/reference/hf_jobs_api.md): whoami-v2; repos create/delete; validate-yaml; preupload (always
"regular"); NDJSON commits (file / deletedFile / deletedFolder, optional parentCommit check); tree listing;
paths-info; refs; commits; repo info with and without /revision/{rev}; resolve HEAD/GET with ETag, X-Repo-Commit,
Content-Length and Range -> 206; for model, dataset and space repos; buckets: create (`create_bucket`, 409 when it
exists) and info (`bucket_info`), stored as a plain folder `root/buckets/{ns}/{name}/files/` that bucket volumes
mount read-write. Jobs live in tests/hub_emulator_jobs.py.

Storage under `root/repos/{type}/{namespace}/{name}/`: `objects/` holds blobs named by their git blob sha1,
`commits/{sha}.json` a full file map per commit, `meta.json` the branch refs. Every commit gets a fresh 40-hex
sha and old commits stay readable. A new emulator on the same root sees the repos of the previous one.
Not emulated: LFS/Xet uploads, bucket file transfer APIs (Xet), pull requests, tags/branches creation, scheduled jobs, private-repo ACLs.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from hub_emulator_jobs import HubHTTPError, JobManager, Reply, iso, route_jobs
from hub_emulator_jobs import json_body as _json_body

logger = logging.getLogger("hub_emulator")

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"(?!\.+$)[\w.-]{1,96}")  # a namespace or repo name (never "." or "..")
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """Git blob sha1, the oid the Hub reports for regular files (and that the client computes locally)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class RepoStore:
    """Content-addressed, commit-per-snapshot repo storage on disk, safe for concurrent requests."""

    def __init__(self, root: Path) -> None:
        self.root = root / "repos"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._commits: dict[str, dict[str, Any]] = {}

    def _dir(self, rtype: str, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if rtype not in URL_PREFIX or len(parts) != 2 or not all(_NAME.fullmatch(p) for p in parts):
            raise HubHTTPError(400, f"Invalid repo id {repo_id!r}")
        return self.root / rtype / repo_id

    def meta(self, rtype: str, repo_id: str) -> dict[str, Any]:
        """Repo metadata (refs, privacy, dates); 404 RepoNotFound if absent."""
        path = self._dir(rtype, repo_id) / "meta.json"
        if not path.is_file():
            raise HubHTTPError(404, f"Repository {rtype}:{repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def create(self, rtype: str, repo_id: str, private: bool) -> bool:
        """Create a repo with an initial `.gitattributes` commit, as the Hub does; False if it exists."""
        with self._lock:
            d = self._dir(rtype, repo_id)
            if (d / "meta.json").is_file():
                return False
            (d / "objects").mkdir(parents=True, exist_ok=True)
            (d / "commits").mkdir(exist_ok=True)
            now = iso(time.time())
            self._save_meta(rtype, repo_id, {"id": repo_id, "type": rtype, "private": private, "createdAt": now,
                                             "lastModified": now, "refs": {}})
            self.commit(rtype, repo_id, "main", "initial commit", "",
                        [("file", ".gitattributes", GITATTRIBUTES)], None, create_branch=True)
            return True

    def delete(self, rtype: str, repo_id: str) -> None:
        """Remove a repo (404 if absent)."""
        with self._lock:
            self.meta(rtype, repo_id)
            shutil.rmtree(self._dir(rtype, repo_id))

    def _save_meta(self, rtype: str, repo_id: str, meta: dict[str, Any]) -> None:
        path = self._dir(rtype, repo_id) / "meta.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(path)

    def resolve(self, rtype: str, repo_id: str, revision: str | None) -> dict[str, Any]:
        """Commit record for a branch name or a (full or >= 7 char) commit sha; 404 RevisionNotFound."""
        meta = self.meta(rtype, repo_id)
        rev = revision or "main"
        sha = meta["refs"].get(rev.removeprefix("refs/heads/"))
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", rev):
            matches = [p.stem for p in (self._dir(rtype, repo_id) / "commits").glob(f"{rev}*.json")]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self._load_commit(rtype, repo_id, sha)

    def _load_commit(self, rtype: str, repo_id: str, sha: str) -> dict[str, Any]:
        key = f"{rtype}/{repo_id}@{sha}"
        if key not in self._commits:
            self._commits[key] = json.loads((self._dir(rtype, repo_id) / "commits" / f"{sha}.json").read_text())
        return self._commits[key]

    def blob_path(self, rtype: str, repo_id: str, oid: str) -> Path:
        """Path of a stored blob."""
        return self._dir(rtype, repo_id) / "objects" / oid[:2] / oid[2:]

    def commit(self, rtype: str, repo_id: str, branch: str, title: str, message: str,
               ops: list[tuple[str, str, bytes | None]], parent_commit: str | None,
               create_branch: bool = False) -> str:
        """Apply (kind, path, data) ops on top of `branch` and return the new commit sha."""
        with self._lock:
            meta = self.meta(rtype, repo_id)
            head = meta["refs"].get(branch)
            if head is None and not create_branch:
                if _SHA.match(branch):
                    raise HubHTTPError(400, "Cannot commit to a commit sha: pass a branch name")
                raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit and parent_commit != head:
                raise HubHTTPError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
            files = dict(self._load_commit(rtype, repo_id, head)["files"]) if head else {}
            sha = hashlib.sha1(f"{head}\n{title}\n{time.time_ns()}\n{uuid.uuid4()}".encode()).hexdigest()
            for kind, path, data in ops:
                path = path.strip("/")
                if not path or any(part in ("", ".", "..") for part in path.split("/")):
                    raise HubHTTPError(400, f"Invalid path in repo: {path!r}")
                if kind == "file":
                    oid = git_blob_oid(data)
                    blob = self.blob_path(rtype, repo_id, oid)
                    if not blob.exists():
                        blob.parent.mkdir(parents=True, exist_ok=True)
                        blob.write_bytes(data)
                    if files.get(path, {}).get("oid") != oid:
                        files[path] = {"oid": oid, "size": len(data), "commit": sha}
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif kind == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubHTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            now = iso(time.time())
            record = {"id": sha, "parents": [head] if head else [], "title": title, "message": message,
                      "date": now, "author": repo_id.split("/")[0], "files": files}
            (self._dir(rtype, repo_id) / "commits" / f"{sha}.json").write_text(json.dumps(record))
            meta["refs"][branch] = sha
            meta["lastModified"] = now
            self._save_meta(rtype, repo_id, meta)
            logger.info("commit %s on %s:%s@%s (%d ops)", sha[:8], rtype, repo_id, branch, len(ops))
            return sha

    def history(self, rtype: str, repo_id: str, revision: str | None) -> list[dict[str, Any]]:
        """Commits reachable from `revision`, newest first."""
        out, commit = [], self.resolve(rtype, repo_id, revision)
        while True:
            out.append(commit)
            if not commit["parents"]:
                return out
            commit = self._load_commit(rtype, repo_id, commit["parents"][0])

    def tree_entries(self, commit: dict[str, Any], prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Tree listing entries below `prefix` (404 EntryNotFound if it is not a folder of the commit)."""
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        below = {p: f for p, f in commit["files"].items() if p.startswith(base)}
        if prefix and not below:
            raise HubHTTPError(404, f"{prefix} does not exist on {commit['id']}", "EntryNotFound")
        files: dict[str, dict] = {}
        folders: set[str] = set()
        for path, info in below.items():
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(base + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files[path] = info
        entries = [self.folder_entry(commit, d) for d in sorted(folders)]
        entries += [{"type": "file", "oid": f["oid"], "size": f["size"], "path": p, "_commit": f["commit"]}
                    for p, f in sorted(files.items())]
        return entries

    @staticmethod
    def folder_entry(commit: dict[str, Any], folder: str) -> dict[str, Any]:
        """A directory entry whose oid hashes the folder's content."""
        inside = sorted(f"{p}:{f['oid']}" for p, f in commit["files"].items() if p.startswith(folder + "/"))
        shas = {f["commit"] for p, f in commit["files"].items() if p.startswith(folder + "/")}
        return {"type": "directory", "oid": hashlib.sha1("\n".join(inside).encode()).hexdigest(), "size": 0,
                "path": folder, "_commit": ",".join(sorted(shas))}

    def materialise(self, rtype: str, repo_id: str, revision: str | None, subpath: str | None, dest: Path) -> None:
        """Copy the files of `revision` below `subpath` into `dest` (the content of a read-only volume)."""
        commit = self.resolve(rtype, repo_id, revision)
        base = (subpath or "").strip("/")
        base = base + "/" if base else ""
        chosen = {p[len(base):]: f for p, f in commit["files"].items() if p.startswith(base)}
        if not chosen:
            raise HubHTTPError(404, f"path {subpath!r} not found at {commit['id']}", "EntryNotFound")
        for rel, info in chosen.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.blob_path(rtype, repo_id, info["oid"]).read_bytes())
        dest.mkdir(parents=True, exist_ok=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], emulator: "HubEmulator") -> None:
        self.emulator = emulator
        self.open_sockets: set[socket.socket] = set()
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[override]
        self.open_sockets.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler: drains every request body, always sends Content-Length or chunks."""

    protocol_version = "HTTP/1.1"
    server_version = "HubEmulator/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        logger.debug("%s " + format, self.address_string(), *args)

    def _dispatch_any(self) -> None:
        self._dispatch(self.command)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch_any

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        segs = [unquote(s) for s in url.path.split("/") if s]
        query = parse_qs(url.query, keep_blank_values=True)
        emulator = self.server.emulator
        emulator.requests.append((method, self.path))
        try:
            if segs != ["api", "agent-harnesses"]:  # public, fetched without a token by the client
                emulator.check_auth(self.headers.get("Authorization"))
            reply = emulator.route(method, segs, query, body, self.headers)
        except HubHTTPError as err:
            reply = _error_reply(err)
        except Exception as err:  # a bug in the emulator: report it as a 500 and log the traceback
            logger.exception("emulator error on %s %s", method, self.path)
            reply = _error_reply(HubHTTPError(500, f"emulator error: {err!r}"))
        self._send(reply, head=method == "HEAD")

    def _send(self, reply: Reply, head: bool) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        if reply.stream is None:
            data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            if "Content-Length" not in reply.headers:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in reply.stream:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away (e.g. a non-follow log fetch breaking early)
            self.close_connection = True
        except Exception:  # a bug in a stream: the chunked reply cannot be completed, drop the connection
            logger.exception("emulator stream error on %s", self.path)
            self.close_connection = True
        finally:
            reply.stream.close()  # type: ignore[union-attr]


def _error_reply(err: HubHTTPError) -> Reply:
    headers = {"X-Error-Message": err.message.replace("\n", " ").encode("ascii", "replace").decode(), **err.headers}
    if err.error_code:
        headers["X-Error-Code"] = err.error_code
    return Reply(status=err.status, body={"error": err.message}, headers=headers)


class HubEmulator:
    """A local Hub (repos + Jobs) on `http://127.0.0.1:{port}` storing everything under `root`.

    `namespace` is the user returned by whoami; `orgs` are extra namespaces it may write to. With `token`, every
    request must carry `Authorization: Bearer <token>` (401 otherwise). `scheduling_delay_s` is how long jobs stay
    in SCHEDULING, `keepalive_s` the SSE keep-alive period, `kill_grace_s` the SIGTERM -> SIGKILL delay on cancel.
    Test helpers: `kill_job`, `wait_job`, `job_logs`, `job_dir`, `jobs_dir`, `requests` (method, path) log.
    """

    def __init__(self, root: Path, port: int, *, namespace: str = "testuser", token: str | None = None,
                 orgs: tuple[str, ...] = (), host: str = "127.0.0.1", scheduling_delay_s: float = 0.2,
                 keepalive_s: float = 30.0, kill_grace_s: float = 1.0) -> None:
        self.root, self.port, self.host = Path(root), int(port), host
        self.namespace, self.token, self.orgs = namespace, token, tuple(orgs)
        self.endpoint = f"http://{host}:{self.port}"
        self.store = RepoStore(self.root)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.buckets_dir = self.root / "buckets"
        self.job_manager = JobManager(self.jobs_dir, endpoint=self.endpoint, materialise=self._materialise_volume,
                                      scheduling_delay_s=scheduling_delay_s, keepalive_s=keepalive_s,
                                      kill_grace_s=kill_grace_s, bucket_dir=self.bucket_dir)
        self.requests: list[tuple[str, str]] = []
        # commit rate limit (see `limit_commits`): (k commits, per window_s, Retry-After seconds or None)
        self.commit_limit: tuple[int, float, float | None] | None = None
        self.commit_times: dict[str, list[float]] = {}
        self.rate_limited: list[str] = []  # repo id of every commit answered 429
        self.validate_yaml_error: str | None = None
        self._limit_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubEmulator":
        """Bind the port and serve in a background thread."""
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"hub-emulator-{self.port}", daemon=True)
        self._thread.start()
        logger.info("Hub emulator serving %s from %s", self.endpoint, self.root)
        return self

    def stop(self) -> None:
        """Kill live jobs, stop serving and close open keep-alive connections."""
        self.job_manager.shutdown()
        if self._server is not None:
            self._server.shutdown()
            for sock in list(self._server.open_sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._server.server_close()
            self._thread.join(timeout=5)  # type: ignore[union-attr]
            self._server = None

    def __enter__(self) -> "HubEmulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -------------------------------------------------------------- test helpers
    def limit_commits(self, k: int | None, window_s: float = 3600.0, retry_after_s: float | None = 1.0) -> None:
        """Answer 429 to a repo's commit once it had ``k`` commits in the last ``window_s`` seconds (the Hub's
        "128 per hour" limit, scaled); ``Retry-After`` is sent when ``retry_after_s`` is not None. None lifts it."""
        with self._limit_lock:
            self.commit_limit = None if k is None else (int(k), float(window_s), retry_after_s)
            self.commit_times.clear()

    def _check_commit_rate(self, repo_key: str) -> None:
        with self._limit_lock:
            if self.commit_limit is None:
                return
            k, window, retry_after = self.commit_limit
            now = time.monotonic()
            times = [t for t in self.commit_times.get(repo_key, []) if now - t < window]
            self.commit_times[repo_key] = times
            if len(times) >= k:
                self.rate_limited.append(repo_key)
                headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
                raise HubHTTPError(429, f"You have exceeded the rate limit for repository commits ({k} per "
                                        f"{window:g} s, emulated). Please retry later.", headers=headers)
            times.append(now)

    def kill_attempt(self, job_id: str) -> None:
        """SIGKILL the running attempt of a job; with attempts left the job reruns (a Hub-native retry)."""
        self.job_manager.kill_attempt(job_id)

    def kill_job(self, job_id: str, message: str = "Job was killed (emulated node failure)") -> dict[str, Any]:
        """SIGKILL a job's process group abruptly, mark it ERROR with `message`; returns its JobInfo payload."""
        return self.job_manager.info(self.job_manager.kill(job_id, message))

    def wait_job(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until a job is terminal and return its JobInfo payload."""
        return self.job_manager.info(self.job_manager.wait(job_id, timeout))

    def job_logs(self, job_id: str) -> list[str]:
        """Log lines of a job, start markers dropped (what `fetch_job_logs` yields)."""
        return self.job_manager.logs(job_id)

    def bucket_dir(self, bucket_id: str) -> Path:
        """The live folder of bucket `ns/name` (what a read-write bucket volume mounts); 404 when there is none."""
        folder = self.buckets_dir / bucket_id / "files"
        if bucket_id.count("/") != 1 or ".." in bucket_id or not folder.is_dir():
            raise HubHTTPError(404, f"Bucket {bucket_id} not found", error_code="RepoNotFound")
        return folder

    def _bucket_api(self, method: str, segs: list[str], body: bytes) -> Reply:
        """`POST /api/buckets/{ns}/{name}` (create; 409 when it exists) and `GET` (bucket_info)."""
        if len(segs) != 2:
            raise HubHTTPError(404, f"Not found: {method} /api/buckets/{'/'.join(segs)} (not emulated)")
        ns, name = segs
        bid = f"{ns}/{name}"
        meta_path = self.buckets_dir / bid / "meta.json"
        url = f"{self.endpoint}/buckets/{bid}"
        if method == "POST":
            self.owner_for(ns)
            if not _NAME.fullmatch(name):
                raise HubHTTPError(400, f"Invalid bucket name: {name}")
            if meta_path.exists():
                return Reply(status=409, body={"error": "You already created this bucket", "url": url})
            data = _json_body(body)
            (self.buckets_dir / bid / "files").mkdir(parents=True)
            meta_path.write_text(json.dumps({"private": data.get("visibility", "public") == "private",
                                             "createdAt": iso(time.time())}))
            return Reply(body={"url": url, "name": bid, "id": bid})
        if method == "GET":
            if not meta_path.exists():
                raise HubHTTPError(404, f"Bucket {bid} not found", error_code="RepoNotFound")
            meta = json.loads(meta_path.read_text())
            files = [f for f in (self.buckets_dir / bid / "files").rglob("*") if f.is_file()]
            return Reply(body={"id": bid, "private": meta["private"], "createdAt": meta["createdAt"],
                               "size": sum(f.stat().st_size for f in files), "totalFiles": len(files)})
        raise HubHTTPError(405, "Method not allowed")

    def job_dir(self, job_id: str) -> Path:
        """`jobs_dir/<id>`: spec.json (secret names only), logs.jsonl, status.json, mounts/, work/, home/."""
        return self.jobs_dir / job_id

    def job_secrets(self, job_id: str) -> dict[str, Any]:
        """The secrets a job was given (server side only; never served over HTTP)."""
        return dict(self.job_manager.jobs[job_id].spec.get("secrets") or {})

    # ----------------------------------------------------------------- routing
    def check_auth(self, header: str | None) -> None:
        """401 unless the emulator has no token or the request carries `Bearer <token>`."""
        if self.token is None:
            return
        if not header:
            raise HubHTTPError(401, "Authorization header is required")
        if header != f"Bearer {self.token}":
            raise HubHTTPError(401, "Invalid credentials in Authorization header")

    def owner_for(self, ns: str) -> dict[str, str]:
        """Owner record of a namespace the token may act on (403 for any other)."""
        if ns == self.namespace:
            return {"id": hashlib.sha1(ns.encode()).hexdigest()[:24], "name": ns, "type": "user"}
        if ns in self.orgs:
            return {"id": hashlib.sha1(ns.encode()).hexdigest()[:24], "name": ns, "type": "org"}
        raise HubHTTPError(403, f"You don't have the rights to act in namespace {ns}")

    def whoami(self) -> dict[str, Any]:
        """The `whoami-v2` payload."""
        user = self.owner_for(self.namespace)
        return {"type": "user", "id": user["id"], "name": self.namespace, "fullname": self.namespace,
                "email": f"{self.namespace}@example.invalid", "emailVerified": True, "isPro": False,
                "orgs": [{"type": "org", "name": o, "id": self.owner_for(o)["id"]} for o in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "hub-emulator", "role": "write"}}}

    def route(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes, headers: Any) -> Reply:
        """Dispatch one request to the repo, resolve or jobs handlers."""
        if segs == ["api", "whoami-v2"] and method == "GET":
            return Reply(body=self.whoami())
        if segs == ["api", "agent-harnesses"]:  # agent-detection registry: empty means "no agent"
            return Reply(body={"standardEnvVars": [], "harnesses": {}})
        if segs[:2] == ["api", "buckets"]:
            return self._bucket_api(method, segs[2:], body)
        if segs[:2] == ["api", "jobs"]:
            return route_jobs(self.job_manager, method, segs[2:], query, body, self.owner_for)
        if segs == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(_json_body(body))
        if segs == ["api", "repos", "delete"] and method == "DELETE":
            data = _json_body(body)
            ns = data.get("organization") or self.namespace
            self.owner_for(ns)
            self.store.delete(data.get("type") or "model", f"{ns}/{data['name']}")
            return Reply(body={})
        if segs == ["api", "validate-yaml"] and method == "POST":
            if self.validate_yaml_error:
                raise HubHTTPError(400, self.validate_yaml_error)
            return Reply(body={"errors": [], "warnings": []})
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in REPO_TYPES:
            return self._repo_api(method, REPO_TYPES[segs[1]], f"{segs[2]}/{segs[3]}", segs[4:], query, body)
        rtype, rest = (REPO_TYPES[segs[0]], segs[1:]) if segs and segs[0] in ("datasets", "spaces") else ("model", segs)
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(rtype, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]), headers.get("Range"))
        logger.warning("hub emulator: no route for %s /%s", method, "/".join(segs))
        raise HubHTTPError(404, f"Not found: {method} /{'/'.join(segs)}")

    def _create_repo(self, data: dict[str, Any]) -> Reply:
        ns = data.get("organization") or self.namespace
        self.owner_for(ns)
        rtype, repo_id = data.get("type") or "model", f"{ns}/{data.get('name')}"
        if rtype not in URL_PREFIX or not _NAME.fullmatch(str(data.get("name"))):
            raise HubHTTPError(400, f"Invalid repo name or type: {rtype}:{repo_id}")
        url = f"{self.endpoint}/{URL_PREFIX[rtype]}{repo_id}"
        private = data.get("visibility") == "private" or bool(data.get("private"))
        if not self.store.create(rtype, repo_id, private):
            return Reply(status=409, body={"error": f"You already created this {rtype} repo", "url": url},
                         headers={"X-Error-Message": f"You already created this {rtype} repo"})
        return Reply(body={"url": url, "name": repo_id, "id": repo_id})

    def _repo_api(self, method: str, rtype: str, repo_id: str, rest: list[str], query: dict[str, list[str]],
                  body: bytes) -> Reply:
        flag = lambda name: (query.get(name) or ["false"])[0].lower() in ("1", "true")  # noqa: E731
        if method == "GET" and (not rest or rest[0] == "revision"):
            return Reply(body=self._repo_info(rtype, repo_id, rest[1] if len(rest) > 1 else None, flag("blobs")))
        if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
            commit = self.store.resolve(rtype, repo_id, rest[1])
            entries = self.store.tree_entries(commit, "/".join(rest[2:]), flag("recursive"))
            return Reply(body=[self._entry(rtype, repo_id, e, flag("expand")) for e in entries])
        if method == "POST" and rest[0] == "paths-info" and len(rest) == 2:
            commit = self.store.resolve(rtype, repo_id, rest[1])
            form = parse_qs(body.decode(), keep_blank_values=True)
            out = []
            for path in (p.strip("/") for p in form.get("paths", [])):
                if path in commit["files"]:
                    f = commit["files"][path]
                    out.append({"type": "file", "oid": f["oid"], "size": f["size"], "path": path,
                                "_commit": f["commit"]})
                elif any(p.startswith(path + "/") for p in commit["files"]):
                    out.append(self.store.folder_entry(commit, path))
            expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
            return Reply(body=[self._entry(rtype, repo_id, e, expand) for e in out])
        if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
            files = self.store.resolve(rtype, repo_id, rest[1])["files"]
            return Reply(body={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                          "oid": files.get(f["path"].strip("/"), {}).get("oid")}
                                         for f in _json_body(body).get("files", [])]})
        if method == "POST" and rest[0] == "commit" and len(rest) == 2:
            self._check_commit_rate(f"{rtype}/{repo_id}")
            return self._commit(rtype, repo_id, rest[1], query, body)
        if method == "GET" and rest[0] == "commits" and len(rest) == 2:
            history = self.store.history(rtype, repo_id, rest[1])
            return Reply(body=[{"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                                "authors": [{"user": c["author"]}]} for c in history])
        if method == "GET" and rest == ["refs"]:
            refs = self.store.meta(rtype, repo_id)["refs"]
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(refs.items())]
            return Reply(body={"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        raise HubHTTPError(404, f"Not found: {method} /api/{rtype}s/{repo_id}/{'/'.join(rest)}")

    def _entry(self, rtype: str, repo_id: str, entry: dict[str, Any], expand: bool) -> dict[str, Any]:
        out = {k: v for k, v in entry.items() if k != "_commit"}
        if expand:  # a folder's last commit is the newest one among the commits of its files
            commits = [self.store._load_commit(rtype, repo_id, sha) for sha in entry["_commit"].split(",")]
            c = max(commits, key=lambda c: c["date"])
            out["lastCommit"] = {"id": c["id"], "title": c["title"], "date": c["date"]}
        return out

    def _repo_info(self, rtype: str, repo_id: str, revision: str | None, blobs: bool) -> dict[str, Any]:
        meta, commit = self.store.meta(rtype, repo_id), self.store.resolve(rtype, repo_id, revision)
        siblings = [{"rfilename": p, **({"size": f["size"], "blobId": f["oid"]} if blobs else {})}
                    for p, f in sorted(commit["files"].items())]
        info = {"_id": hashlib.sha1(f"{rtype}/{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
                "author": repo_id.split("/")[0], "sha": commit["id"], "private": meta["private"], "disabled": False,
                "gated": False, "createdAt": meta["createdAt"], "lastModified": commit["date"], "tags": [],
                "downloads": 0, "likes": 0, "siblings": siblings,
                "usedStorage": sum(f["size"] for f in commit["files"].values())}
        if rtype == "model":
            info["modelId"] = repo_id
        return info

    def _commit(self, rtype: str, repo_id: str, branch: str, query: dict[str, list[str]], body: bytes) -> Reply:
        if (query.get("create_pr") or ["0"])[0] not in ("0", "false", ""):
            raise HubHTTPError(400, "create_pr is not supported by the hub emulator")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "The first NDJSON line of a commit must be the header")
        header, ops = lines[0]["value"], []
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            if key == "file":
                content = value.get("content", "")
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                ops.append(("file", value["path"], data))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, value["path"], None))
            else:
                raise HubHTTPError(400, f"Unsupported commit operation {key!r} (the emulator answers 'regular')")
        sha = self.store.commit(rtype, repo_id, branch, header.get("summary") or "Commit",
                                header.get("description") or "", ops, header.get("parentCommit"))
        url = f"{self.endpoint}/{URL_PREFIX[rtype]}{repo_id}/commit/{sha}"
        return Reply(body={"commitUrl": url, "commitOid": sha, "pullRequestUrl": None, "success": True})

    def _resolve(self, rtype: str, repo_id: str, revision: str, path: str, range_header: str | None) -> Reply:
        commit = self.store.resolve(rtype, repo_id, revision)
        info = commit["files"].get(path)
        if info is None:
            return Reply(status=404, body={"error": f"Entry not found: {path}"},
                         headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                  "X-Repo-Commit": commit["id"]})
        data = self.store.blob_path(rtype, repo_id, info["oid"]).read_bytes()
        headers = {"ETag": f'"{info["oid"]}"', "X-Repo-Commit": commit["id"], "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (range_header or "").strip())
        if match and match.groups() != ("", ""):
            size, (lo, hi) = len(data), match.groups()
            if lo == "":  # suffix range: the last `hi` bytes
                start, end = max(0, size - int(hi)), size - 1
            else:
                start, end = int(lo), min(int(hi or size - 1), size - 1)
            if start >= size or start > end:
                return Reply(status=416, body=b"", headers={**headers, "Content-Range": f"bytes */{size}"},
                             content_type="application/octet-stream")
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return Reply(status=206, body=data[start:end + 1], headers=headers, content_type="application/octet-stream")
        return Reply(body=data, headers=headers, content_type="application/octet-stream")

    def _materialise_volume(self, volume: dict[str, Any], dest: Path) -> None:
        self.store.materialise(volume["type"], volume["source"], volume.get("revision"), volume.get("path"), dest)


_SHARED: dict[str, Any] = {"emulator": None, "users": 0}
_SHARED_LOCK = threading.Lock()


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubEmulator]:
    """The session's Hub emulator on $COVTOKEN_TEST_HUB_PORT, requiring the suite's HF_TOKEN.

    One emulator per process even when several test modules import this fixture (each import makes its own
    session fixture definition); it stops when the last of them is torn down. Tests share it: use unique repo names.
    """
    with _SHARED_LOCK:
        if _SHARED["emulator"] is None:
            port = int(os.environ["COVTOKEN_TEST_HUB_PORT"])
            emulator = HubEmulator(tmp_path_factory.mktemp("hub_emulator"), port, token=os.environ.get("HF_TOKEN"))
            from huggingface_hub import constants

            if constants.ENDPOINT.rstrip("/") != emulator.endpoint:
                raise RuntimeError(f"huggingface_hub points at {constants.ENDPOINT}, not {emulator.endpoint}: "
                                   "HF_ENDPOINT must be set (tests/conftest.py) before huggingface_hub is imported")
            _SHARED["emulator"] = emulator.start()
        _SHARED["users"] += 1
        emulator = _SHARED["emulator"]
    try:
        yield emulator
    finally:
        with _SHARED_LOCK:
            _SHARED["users"] -= 1
            if _SHARED["users"] == 0:
                emulator.stop()
                _SHARED["emulator"] = None
