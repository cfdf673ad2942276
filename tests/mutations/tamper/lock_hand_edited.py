"""A threshold hand-edited in (a copy of) the lock the audit reads."""
import json
import shutil

EXPECT = "digest"


def tamper(ws):
    lock = shutil.copy(ws.lock, ws.results.parent / "lock.json")
    doc = json.loads(open(lock).read())
    doc["gates"]["G1"]["entries"]["embedded"]["criteria"][0]["threshold"] = 0.1
    open(lock, "w").write(json.dumps(doc, indent=2))
    ws.lock = lock
    ws.flags["allow_unproven_prereg"] = True  # only the hand edit can catch it
