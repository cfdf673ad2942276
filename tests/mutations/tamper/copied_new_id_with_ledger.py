"""A copy under a new run id with a forged ledger start entry, so only the content digest can catch it."""
import json
import shutil

EXPECT = "counted twice"


def tamper(ws):
    new = ws.run_id[:-6] + "fedcba"
    shutil.copytree(ws.results / "artefacts" / ws.run_id, ws.results / "artefacts" / new)
    (ws.results / f"{new}.json").write_text(ws.record.read_text().replace(ws.run_id, new))
    with open(ws.results / "ledger.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "start", "run_id": new, "gate_id": "G1", "time": "2026-01-01T00:00:00Z"}) + "\n")
