"""A ledger start entry whose run never produced a record (a hidden run)."""
import json

EXPECT = "no record"


def tamper(ws):
    with open(ws.results / "ledger.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "start", "run_id": "g1-20990101t000000-cccccc", "gate_id": "G1",
                             "time": "2099-01-01T00:00:00Z"}) + "\n")
