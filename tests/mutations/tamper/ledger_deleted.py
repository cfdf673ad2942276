"""The run ledger deleted: the record no longer proves it was started here."""
EXPECT = "no start entry"


def tamper(ws):
    (ws.results / "ledger.jsonl").unlink()
