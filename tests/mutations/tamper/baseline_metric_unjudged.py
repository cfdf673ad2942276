"""A metric no criterion uses (the intensity baseline) lowered to 0.51."""
EXPECT = "metrics/intensity_baseline_auroc"


def tamper(ws):
    ws.edit(lambda d: d["metrics"]["intensity_baseline_auroc"].__setitem__("value", 0.51))
