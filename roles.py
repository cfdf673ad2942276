"""What each role of a job computed, as digests: the quantities the whole-job label-leak test compares.

Every split of a gate has a role, in this order: **fit** (label-free construction, probe training), **select**
(choices on validation), **calibrate** (thresholds, conformal quantiles), **judge** (the test metrics). A job
marks each quantity a role hands on with :func:`role_output` at the point where the next role consumes it:

    role_output("fit", "scores", scores)          # what evaluation will read
    role_output("select", "selection", res.selection)

Outside a :func:`recording` block this is a no-op returning ``value``. Inside it (the leak test runs a whole
job in-process that way) each quantity is digested (dtype, shape and bytes of arrays; canonical JSON of the
rest), so ``tests/test_label_leak_jobs.py`` can require every quantity of an earlier role to be bit-identical
when the labels of later roles are permuted, flipped or zeroed.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import json
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["ROLES", "RoleLog", "RoleStop", "role_output", "recording", "digest"]

#: The roles, in the order information may flow.
ROLES = ("fit", "select", "calibrate", "judge")

_ACTIVE: contextvars.ContextVar["RoleLog | None"] = contextvars.ContextVar("covtoken_role_log", default=None)


def _canonical(value: Any, h: "hashlib._Hash") -> None:  # type: ignore[name-defined]
    """Feed an unambiguous encoding of ``value`` to ``h`` (arrays by dtype, shape and bytes)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        if arr.dtype == object:
            h.update(b"O" + json.dumps([repr(v) for v in arr.reshape(-1)]).encode() + repr(arr.shape).encode())
            return
        h.update(f"A{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=repr):
            h.update(repr(k).encode() + b":")
            _canonical(value[k], h)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _canonical(v, h)
            h.update(b",")
        h.update(b"]")
    elif isinstance(value, (set, frozenset)):
        _canonical(sorted(value, key=repr), h)
    elif isinstance(value, functools.partial):  # a predictor: the function and everything bound to it
        _canonical((f"{value.func.__module__}.{value.func.__qualname__}", list(value.args), dict(value.keywords)), h)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, h)
    elif isinstance(value, (np.generic,)):
        _canonical(np.asarray(value), h)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(type(value).__name__.encode() + b"=" + (value if isinstance(value, bytes) else repr(value).encode()))
    else:
        raise TypeError(f"role_output cannot digest a {type(value).__name__}; pass arrays, numbers, strings or "
                        "containers of them")


def digest(value: Any) -> str:
    """sha256 of the canonical encoding of ``value`` (bit-exact for floats and arrays)."""
    h = hashlib.sha256()
    _canonical(value, h)
    return h.hexdigest()


class RoleStop(BaseException):
    """Raised by :func:`role_output` inside ``recording(stop_after=role)`` once a later role has handed on a value:
    the rest of the job cannot change what the earlier roles computed, so a test need not wait for it."""


class RoleLog:
    """Digests of the quantities each role handed on, in the order they were marked."""

    def __init__(self, stop_after: str | None = None) -> None:
        if stop_after is not None and stop_after not in ROLES:
            raise ValueError(f"unknown role {stop_after!r}; roles are {', '.join(ROLES)}")
        self.entries: dict[str, dict[str, str]] = {r: {} for r in ROLES}
        self.stop_after = stop_after

    def add(self, role: str, name: str, value: Any) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        key, n = name, 1
        while key in self.entries[role]:  # the same name marked twice (e.g. per modality in a loop)
            n += 1
            key = f"{name}#{n}"
        self.entries[role][key] = digest(value)
        if self.stop_after is not None and ROLES.index(role) > ROLES.index(self.stop_after):
            raise RoleStop(f"{role}:{key}")

    def upto(self, role: str) -> dict[str, str]:
        """Every digest of ``role`` and the roles before it, keyed ``"<role>:<name>"``."""
        out = {}
        for r in ROLES[: ROLES.index(role) + 1]:
            out.update({f"{r}:{k}": v for k, v in self.entries[r].items()})
        return out

    def after(self, role: str) -> dict[str, str]:
        """Every digest of the roles after ``role``."""
        out = {}
        for r in ROLES[ROLES.index(role) + 1:]:
            out.update({f"{r}:{k}": v for k, v in self.entries[r].items()})
        return out


def role_output(role: str, name: str, value: Any) -> Any:
    """Mark ``value`` as an output of ``role`` (digested while :func:`recording`); returns ``value`` unchanged."""
    log = _ACTIVE.get()
    if log is not None:
        log.add(role, name, value)
    elif role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return value


@contextmanager
def recording(stop_after: str | None = None) -> Iterator[RoleLog]:
    """Collect the role outputs of everything run inside the block.

    Args:
        stop_after: raise :class:`RoleStop` as soon as a role after this one hands on its first value.
    """
    log = RoleLog(stop_after)
    token = _ACTIVE.set(log)
    try:
        yield log
    finally:
        _ACTIVE.reset(token)
