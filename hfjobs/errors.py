"""The backend's user error and the translation of Hub failures into one line that says what to do.

Every failure a user can fix (not logged in, a repo that does not exist, no permission, the Hub down or
rate-limiting after the retries) becomes an :class:`HFJobsError` whose message is one line naming the
repo, flag or command; the CLI layer prints it and exits 2.
"""
from __future__ import annotations

from typing import Any

__all__ = ["HFJobsError", "hub_error_message", "is_transport_error"]

_TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "h11")


class HFJobsError(RuntimeError):
    """A submission or a query that cannot go on; the message says why and what to do (exit status 2)."""


def is_transport_error(exc: BaseException) -> bool:
    """A connection-level failure of the HTTP client (refused, reset, timed out), not an HTTP answer."""
    return type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES


def _status(exc: Any) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def hub_error_message(exc: BaseException, *, repo: str | None = None) -> str | None:
    """One line for a Hub failure a user can act on, or None when ``exc`` is not one."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

    where = constants.ENDPOINT
    if isinstance(exc, LocalTokenNotFoundError):
        return "not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN), then retry"
    if is_transport_error(exc):
        return (f"cannot reach the Hub at {where} ({type(exc).__name__}): check the network or HF_ENDPOINT, "
                "then retry")
    if not isinstance(exc, HfHubHTTPError):
        return None
    status = _status(exc)
    what = f"repo {repo}" if repo else "the request"
    if status == 401:
        return ("the Hub rejected the token (401): run `hf auth login` again (or set a valid HF_TOKEN), then retry")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return (f"{what} not found on {where} (404), or the token cannot see it: check --results-repo / "
                "--namespace and `hf auth whoami`")
    if status == 403:
        return (f"no permission for {what} (403): use a token with write access to that namespace "
                "(`hf auth login`), or pass --namespace / --results-repo you own")
    if status == 429:
        return "the Hub is rate-limiting this account (429) even after retries: wait a few minutes, then retry"
    if status is not None and status >= 500:
        return f"the Hub at {where} is failing ({status}) even after retries: try again later"
    return None
