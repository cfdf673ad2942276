"""A record duplicated (same run id) into a subfolder."""
import shutil

EXPECT = "duplicate of"


def tamper(ws):
    (ws.results / "again").mkdir()
    shutil.copy(ws.record, ws.results / "again" / ws.record.name)
