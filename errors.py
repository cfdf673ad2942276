"""Expected errors end in one line naming the flag, key, file or row, and exit status 2 (``--debug``: traceback).

:func:`report_errors` wraps every user-facing entry point (``covtoken`` and its subcommands, each job's
``main``). A user error is an exception of the kinds listed in :data:`EXPECTED` - bad flags and config values,
unreadable or malformed files, unknown names, missing or unwritable paths, a full disk; everything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from typing import Callable

__all__ = ["UserError", "EXPECTED", "one_line", "report_errors", "OneLineParser"]

log = logging.getLogger("covtoken.errors")


class UserError(Exception):
    """An error in what the user asked for or handed in (a flag, key, file or row); its message names it."""


def _expected() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [UserError, OSError, ValueError, KeyError, LookupError]
    try:
        import jsonschema

        kinds += [jsonschema.ValidationError, jsonschema.SchemaError]
    except ImportError:  # pragma: no cover - jsonschema is a dependency
        pass
    return tuple(kinds)


#: exception kinds reported as one line with exit status 2
EXPECTED = _expected()


def one_line(exc: BaseException, *, writing: str | None = None) -> str:
    """The error as one line: OSErrors name their path (a full disk names ``writing`` when the error has none)."""
    if isinstance(exc, OSError) and not isinstance(exc, (UserError,)):
        path = exc.filename if exc.filename is not None else None
        what = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno == errno.ENOSPC:
            what = "no space left on device"
        if path is None and writing:
            path = f"(writing under {writing})"
        msg = f"{path}: {what}" if path is not None else what
        if exc.filename2:
            msg += f" -> {exc.filename2}"
    elif isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    else:
        msg = str(exc) or type(exc).__name__
        if hasattr(exc, "json_path") and hasattr(exc, "message"):  # jsonschema.ValidationError
            msg = f"{exc.json_path}: {exc.message}"
    return " ".join(msg.split())  # one line, whatever the message held


def report_errors(fn: Callable[[], int], *, debug: bool = False, writing: str | None = None) -> int:
    """Run ``fn``; an expected error is printed as ``error: <one line>`` on stderr and returns 2.

    Args:
        fn: the command.
        debug: print the traceback too.
        writing: folder the command writes to (named when a full disk gives no path).
    """
    try:
        return int(fn() or 0)
    except EXPECTED as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {one_line(exc, writing=writing)}\n")
        sys.stderr.flush()
        return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: <prog>: <message>``; the usage stays in ``--help``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {' '.join(message.split())}\n")
        raise SystemExit(2)
