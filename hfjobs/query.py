"""Hub look-ups shared by submit, status, fetch and sweep: the client, the namespace, a run's jobs and files.

Every call goes through :func:`~covtoken.hfjobs.retry.with_retry`, and a Hub failure a user can act on
(not logged in, no such repo, no permission, the Hub down) becomes an :class:`HFJobsError` with one line
saying what to do (:func:`hub_call`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from ..record import loads_strict
from .errors import HFJobsError, hub_error_message
from .hubsync import attempt_path
from .retry import with_retry

__all__ = ["hub_api", "local_token", "namespace_of", "hub_call", "repo_files", "read_json", "jobs_of_run",
           "last_attempt", "LIVE"]

T = TypeVar("T")
LIVE = ("SCHEDULING", "RUNNING")


def hub_api() -> Any:
    """An ``HfApi`` on ``HF_ENDPOINT`` with the local token."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the CLI reports what it fetched itself
    return HfApi()


def hub_call(fn: Callable[..., T], *args: Any, what: str, repo: str | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with retries; a failure a user can act on becomes one-line :class:`HFJobsError`."""
    try:
        return with_retry(fn, *args, what=what, **kwargs)
    except HFJobsError:
        raise
    except Exception as exc:
        msg = hub_error_message(exc, repo=repo)
        if msg is None:
            raise
        raise HFJobsError(msg) from exc


def local_token() -> str:
    """The local HF token (``HF_TOKEN`` or ``hf auth login``); it only ever goes to a job as a secret."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HFJobsError("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN), then retry")
    return token


def namespace_of(api: Any, namespace: str | None) -> str:
    """``namespace`` or the token's user name (asks the Hub; needs a token)."""
    if namespace:
        return namespace
    local_token()
    return hub_call(api.whoami, what="whoami")["name"]


def read_json(api: Any, repo: str, path: str, revision: str | None = None) -> Any:
    """A JSON file of the results repo (strict)."""
    from huggingface_hub import hf_hub_download

    local = hub_call(hf_hub_download, repo, path, what="hf_hub_download", repo=repo, repo_type="dataset",
                     revision=revision)
    return loads_strict(Path(local).read_text(), source=f"{repo}/{path}")


def repo_files(api: Any, repo: str, prefix: str) -> list[str]:
    """Files of the results repo under ``prefix`` (empty if there is none)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    def listing() -> list[str]:
        try:
            return [e.path for e in api.list_repo_tree(repo, path_in_repo=prefix, recursive=True,
                                                       repo_type="dataset") if isinstance(e, RepoFile)]
        except (EntryNotFoundError, RepositoryNotFoundError):
            return []

    return hub_call(listing, what="list_repo_tree", repo=repo)


def jobs_of_run(api: Any, namespace: str, run_id: str) -> list[Any]:
    """The jobs of a run, by attempt."""
    jobs = hub_call(lambda: list(api.list_jobs(labels={"run": run_id}, namespace=namespace)), what="list_jobs")
    return sorted(jobs, key=lambda j: int((j.labels or {}).get("attempt", "0")))


def last_attempt(api: Any, repo: str, run_id: str) -> dict:
    """The latest ``runs/<id>/attempts/<n>.json`` of a run."""
    files = [f for f in repo_files(api, repo, f"runs/{run_id}/attempts") if f.endswith(".json")]
    if not files:
        raise HFJobsError(f"{repo}: runs/{run_id}/attempts/ is empty; nothing was submitted as run {run_id}")
    n = max(int(Path(f).stem) for f in files)
    return read_json(api, repo, attempt_path(run_id, n))
