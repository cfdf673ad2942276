"""A metric the recipe produced removed from the record (an unflattering one hidden)."""
EXPECT = "missing from the record"


def tamper(ws):
    ws.edit(lambda d: d["metrics"].pop("delta_mid_intensity_auroc"))
