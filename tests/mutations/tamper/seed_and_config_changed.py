"""Seed changed consistently in provenance.seed, the config and the split seed (only the sealed copy disagrees)."""
EXPECT = "seed"


def tamper(ws):
    def f(d):
        s = d["provenance"]["seed"] + 7
        d["provenance"]["seed"] = s
        d["provenance"]["config"]["seed"] = s
    ws.edit(f)
