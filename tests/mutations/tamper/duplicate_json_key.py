"""A duplicate key (a second "decision") injected into the record JSON."""
EXPECT = "duplicate key"


def tamper(ws):
    text = ws.record.read_text()
    ws.record.write_text(text.replace('"decision": ', '"decision": "pass",\n  "decision": ', 1))
