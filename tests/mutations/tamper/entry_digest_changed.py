"""The lock entry digest the record was judged under replaced."""
EXPECT = "lock/entry_digest"


def tamper(ws):
    ws.edit(lambda d: d["lock"].__setitem__("entry_digest", "sha256:" + "12" * 32))
