"""An unknown top-level key added to the record."""
EXPECT = "Additional properties"


def tamper(ws):
    ws.edit(lambda d: d.__setitem__("reviewed_by", "nobody"))
