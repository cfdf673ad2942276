"""The audit pointed at an identical copy of the lock outside the repository (pre-registration unprovable)."""
import shutil

EXPECT = "outside the repository"


def tamper(ws):
    ws.lock = shutil.copy(ws.lock, ws.results.parent / "thresholds.lock.json")
