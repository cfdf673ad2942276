"""A record deleted (with its artefacts): the ledger still lists the run, and NEGATIVE_RESULT.md must show it."""
import shutil

from covtoken.audit import audit_folder, render_negative

EXPECT = "no record"


def tamper(ws):
    ws.record.unlink()
    shutil.rmtree(ws.results / "artefacts" / ws.run_id)


def verify(ws, report):
    rid = ws.run_id
    # with the missing run explicitly allowed, it must still be listed in NEGATIVE_RESULT.md
    assert [m["run_id"] for m in report.missing] == [rid]
    assert rid in render_negative(report)
    allowed = audit_folder(ws.results, lock_path=ws.lock, **{**ws.flags, "allow_missing_records": True})
    assert rid in render_negative(allowed)
