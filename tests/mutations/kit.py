"""The workspace a tamper case mutates: a copy of one audited results folder, its lock and audit flags.

A case is one file in ``tests/mutations/tamper/``: a docstring saying what it forges, ``EXPECT`` (a substring
the audit's problems must contain, so the right check is proven to catch it), and ``tamper(ws)`` which
mutates ``ws`` (a :class:`Workspace`). Optional: ``MODE = "check"`` (caught by ``covtoken audit --check``,
for stale summaries), and ``verify(ws, report)`` for extra requirements.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from covtoken.record import dumps_strict


@dataclass
class Workspace:
    results: Path
    record: Path
    lock: Path
    repo: Path
    flags: dict[str, bool] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.record.stem

    def rec(self) -> dict:
        return json.loads(self.record.read_text())

    def save(self, doc: dict, path: Path | None = None) -> None:
        (path or self.record).write_text(dumps_strict(doc))

    def edit(self, fn: Callable[[dict], Any]) -> None:
        doc = self.rec()
        fn(doc)
        self.save(doc)

    def art(self, name: str) -> Path:
        return self.results / "artefacts" / self.run_id / name

    def rehash(self, name: str) -> None:
        """Update the record's hash and size of artefact ``name`` to the file's current bytes (a forger's step)."""
        f = self.art(name)
        data = f.read_bytes()

        def fix(d: dict) -> None:
            for a in d["artefacts"]:
                if a["path"].endswith("/" + name):
                    a["sha256"], a["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        self.edit(fix)

    def edit_artefact_json(self, name: str, fn: Callable[[Any], Any], *, rehash: bool = True) -> None:
        f = self.art(name)
        doc = json.loads(f.read_text())
        fn(doc)
        f.write_text(dumps_strict(doc))
        if rehash:
            self.rehash(name)

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.repo), *args], capture_output=True, text=True, check=True).stdout.strip()

    def copy_to(self, dest: Path) -> "Workspace":
        shutil.copytree(self.results, dest / "results", symlinks=True)
        return Workspace(dest / "results", dest / "results" / self.record.name, self.lock, self.repo, dict(self.flags))
