"""Run store: disk-full errors name the path; the ledger is append-only JSON lines; content digests ignore run ids."""
from __future__ import annotations

import errno
import os

import pytest

from covtoken import record as record_mod
from covtoken import runstore
from covtoken.record import ArtefactWriter, RecordError, write_json_atomic


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_an_artefact_names_the_path(tmp_path, monkeypatch):
    w = ArtefactWriter(tmp_path, "g1-20260101t000000-abcdef")
    monkeypatch.setattr(record_mod.os, "fsync", _enospc)
    with pytest.raises(OSError, match=r"eval_inputs-0\.npz: cannot write artefact \(No space left") as info:
        w.bytes("eval_inputs-0.npz", b"x" * 100, description="d")
    assert info.value.errno == errno.ENOSPC
    assert not (w.dir / "eval_inputs-0.npz").exists() and not list(w.dir.iterdir())  # nothing partial


def test_disk_full_while_writing_json_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(record_mod.os, "fsync", _enospc)
    with pytest.raises(OSError, match=r"rec\.json: cannot write"):
        write_json_atomic(tmp_path / "rec.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_the_ledger_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(runstore.os, "fsync", _enospc)
    with pytest.raises(OSError, match=r"ledger\.jsonl: cannot append"):
        runstore.append_ledger(tmp_path, {"run_id": "x"})


def test_ledger_round_trip_and_bad_line(tmp_path):
    runstore.append_ledger(tmp_path, {"run_id": "a", "event": "start"})
    runstore.append_ledger(tmp_path, {"run_id": "a", "event": "resume"})
    assert [e["event"] for e in runstore.read_ledger(tmp_path)] == ["start", "resume"]
    with open(tmp_path / runstore.LEDGER, "a") as fh:
        fh.write('{"event": "start"}\n')
    with pytest.raises(RecordError, match=r"ledger\.jsonl:3"):
        runstore.read_ledger(tmp_path)


def test_content_digest_ignores_the_run_id_only():
    a = {"run_id": "g1-20260101t000000-aaaaaa", "x": [1, "artefacts/g1-20260101t000000-aaaaaa/s.json"], "t": "10:00"}
    b = {**a, "run_id": "g1-20260101t000000-bbbbbb", "x": [1, "artefacts/g1-20260101t000000-bbbbbb/s.json"]}
    assert runstore.content_digest(a) == runstore.content_digest(b)
    assert runstore.content_digest(a) != runstore.content_digest({**a, "t": "10:01"})  # a genuine rerun differs


def test_commit_never_overwrites(tmp_path):
    rid = "g1-20260101t000000-abcdef"
    stage = runstore.staging_dir(tmp_path, rid)
    (stage / "artefacts" / rid).mkdir(parents=True)
    (stage / f"{rid}.json").write_text("{}")
    (tmp_path / "artefacts" / rid).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="exists without its record"):
        runstore.commit_run(tmp_path, rid)
    assert os.path.isdir(stage)  # nothing moved, the staged run is kept for inspection
