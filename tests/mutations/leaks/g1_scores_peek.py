"""G1: the label-free stage adds a vanishing multiple of each token's lesion fraction to one arm's scores
(caught by the old stage check too)."""
import numpy as np

KIND = "roles"
JOB = "g1_lesion_subspace"
ROLE = "fit"
HOW = "permuted"


def plant(job, monkeypatch):  # noqa: ANN001
    original = job.label_free_stage

    def leaky(data, bb, splits, P, cfg, bank_dir, on_shard=None):  # noqa: ANN001, ANN202, N803
        bank, rows, scores, bright = original(data, bb, splits, P, cfg, bank_dir, on_shard=on_shard)
        from covtoken.eval.labels import token_lesion_fraction

        frac = token_lesion_fraction(data.masks, bank.image_ids, bank.grid)
        r = np.concatenate([rows["val"], rows["test"]])
        first = sorted(scores)[0]
        return bank, rows, {**scores, first: scores[first] + 1e-9 * frac[r].reshape(-1)}, bright

    monkeypatch.setattr(job, "label_free_stage", leaky)
