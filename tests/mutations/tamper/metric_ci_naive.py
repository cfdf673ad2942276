"""A judged difference's CI shifted."""
EXPECT = "delta_mid_final_auroc"


def tamper(ws):
    def f(d):
        m = d["metrics"]["delta_mid_final_auroc"]
        m["ci"] = [m["ci"][0] + 0.2, m["ci"][1] + 0.2]
    ws.edit(f)
