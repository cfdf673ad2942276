"""G3: the saliency arm's CLS attention of block 0 is nudged towards lesion tokens (caught by the old stage
check too)."""
import dataclasses

import numpy as np

KIND = "roles"
JOB = "g3_membership_vs_saliency"
ROLE = "fit"
HOW = "permuted"


def plant(job, monkeypatch):  # noqa: ANN001
    original = job.label_free_stage

    def leaky(data, bb, splits, P, cfg, bank_dir, on_shard=None):  # noqa: ANN001, ANN202, N803
        lf = original(data, bb, splits, P, cfg, bank_dir, on_shard=on_shard)
        from covtoken.eval.labels import token_lesion_fraction

        pool = np.concatenate([lf.rows["val"], lf.rows["test"]])
        frac = token_lesion_fraction(data.masks, [lf.bank.image_ids[i] for i in pool], lf.bank.grid)
        return dataclasses.replace(lf, saliency={**lf.saliency, 0: lf.saliency[0] + 1e-6 * frac})

    monkeypatch.setattr(job, "label_free_stage", leaky)
