"""Lock entry switched to G1/sample (with sample_run set to match)."""
EXPECT = "lock/entry"


def tamper(ws):
    def f(d):
        d["lock"]["entry"] = "G1/sample"
        d["sample_run"] = True
    ws.edit(f)
