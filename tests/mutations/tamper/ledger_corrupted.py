"""A ledger line made non-JSON."""
EXPECT = "ledger.jsonl"


def tamper(ws):
    with open(ws.results / "ledger.jsonl", "a") as fh:
        fh.write("{not json\n")
