"""A judged metric changed together with its criterion's observed value and point (the decision unchanged)."""
EXPECT = "does not match its recomputation"


def tamper(ws):
    def f(d):
        m = d["metrics"]["mid_auroc"]
        m["value"] = 0.95
        for c in d["criteria"]:
            if c["metric"] == "mid_auroc":
                c["point"] = 0.95
                if c["judged_on"] == "point":
                    c["observed"] = 0.95
    ws.edit(f)
