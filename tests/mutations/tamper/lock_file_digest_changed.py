"""lock.file_digest replaced by a digest of no lock version."""
EXPECT = "lock/file_digest"


def tamper(ws):
    ws.edit(lambda d: d["lock"].__setitem__("file_digest", "sha256:" + "ab" * 32))
