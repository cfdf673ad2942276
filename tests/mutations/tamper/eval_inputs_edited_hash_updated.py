"""The stored evaluation inputs edited (test scores of the baseline shifted) and the record's hash updated."""
import io

import numpy as np

EXPECT = "does not match its recomputation"


def tamper(ws):
    f = ws.art("eval_inputs-0.npz")
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in sorted(arrays) if k.startswith("baseline.") and k.endswith(".test"))
    arrays[key] = -arrays[key]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    f.write_bytes(buf.getvalue())
    ws.rehash("eval_inputs-0.npz")
