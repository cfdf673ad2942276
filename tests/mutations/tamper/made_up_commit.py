"""A made-up commit id: pre-registration can no longer be proven, which must fail (not pass as unavailable)."""
EXPECT = "cannot be proven"


def tamper(ws):
    ws.edit(lambda d: d["provenance"]["code"].__setitem__("commit", "0123456789abcdef0123456789abcdef01234567"))
