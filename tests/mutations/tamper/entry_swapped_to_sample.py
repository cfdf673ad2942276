"""Lock entry switched to G1/sample with the evidence tier set to match (a flow check filed as a sample run)."""
EXPECT = "lock/entry"


def tamper(ws):
    def f(d):
        d["lock"]["entry"] = "G1/sample"
        d["evidence"] = "sample"
    ws.edit(f)
