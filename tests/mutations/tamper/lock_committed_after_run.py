"""The record's code commit moved to the repository's first commit, before the lock entry existed."""
EXPECT = "pre-registered"


def tamper(ws):
    first = ws.git("rev-list", "--max-parents=0", "HEAD").split()[0]
    tree = ws.git("rev-parse", f"{first}^{{tree}}")
    ws.edit(lambda d: d["provenance"]["code"].update(commit=first, tree=tree))
