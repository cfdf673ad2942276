"""Retry a Hub call that met a rate limit (429), a server error (5xx) or a dropped connection.

The wait is the server's ``Retry-After`` when it sends one (seconds or an HTTP date), else an exponential
backoff with jitter capped at ``cap_s``; after ``tries`` calls (or once ``max_total_s`` would be exceeded)
the last error is raised. Each retry is logged as one JSON line (``hub_retry``) so a job log shows them.
"""
from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
from typing import Any, Callable, TypeVar

from .errors import is_transport_error

__all__ = ["RETRY_STATUS", "retryable", "retry_after_s", "with_retry"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def retryable(exc: BaseException) -> bool:
    """429, 5xx, or a transport error (connection refused/reset, timeout)."""
    return _status(exc) in RETRY_STATUS or is_transport_error(exc)


def retry_after_s(exc: BaseException, now: float | None = None) -> float | None:
    """The ``Retry-After`` of the error's response in seconds (delta or HTTP date), or None."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def with_retry(fn: Callable[..., T], *args: Any, what: str, tries: int = 10, base_s: float = 2.0,
               cap_s: float = 300.0, max_total_s: float | None = None, sleep: Callable[[float], None] = time.sleep,
               **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried on 429/5xx/transport errors; ``what`` names the call in the log.

    ``max_total_s`` (default ``$COVTOKEN_HUB_RETRY_MAX_S``, else 1800) bounds the total time spent waiting.
    """
    if max_total_s is None:
        max_total_s = float(os.environ.get("COVTOKEN_HUB_RETRY_MAX_S") or 1800)
    waited = 0.0
    for i in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not retryable(exc) or i + 1 >= tries:
                raise
            hinted = retry_after_s(exc)
            wait = hinted if hinted is not None else min(cap_s, base_s * 2 ** i) * (0.5 + random.random() / 2)
            if waited + wait > max_total_s:
                raise
            log.warning(json.dumps({"event": "hub_retry", "call": what, "status": _status(exc),
                                    "error": type(exc).__name__, "try": i + 1, "wait_s": round(wait, 2),
                                    "retry_after": hinted is not None}))
            sleep(wait)
            waited += wait
    raise AssertionError("unreachable")
