"""Progress bars (rich) with totals and ETA for the long loops: token extraction, bootstrap, pruner and probe training.

Bars are drawn on stderr when it is a terminal (or when ``COVTOKEN_PROGRESS=1``); ``COVTOKEN_PROGRESS=0`` turns
them off. In logs and tests (no terminal) nothing is drawn, so records and log files are unchanged.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Protocol

__all__ = ["progress", "enabled", "Advance"]


class Advance(Protocol):
    def __call__(self, n: int = 1) -> None: ...


def enabled() -> bool:
    flag = os.environ.get("COVTOKEN_PROGRESS", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None, *, unit: str = "") -> Iterator[Advance]:
    """A bar for ``total`` steps; yields ``advance(n=1)``. A no-op when bars are off."""
    if not enabled():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
