"""G4: the membership scores of calibration and test tokens get a vanishing multiple of the lesion fraction,
so the conformal thresholds see the labels (caught by the old stage check too)."""
import numpy as np

KIND = "roles"
JOB = "g4_conformal_retention"
ROLE = "fit"
HOW = "permuted"


def plant(job, monkeypatch):  # noqa: ANN001
    original = job.label_free_stage

    def leaky(data, bb, splits, P, cfg, bank_dir, on_shard=None):  # noqa: ANN001, ANN202, N803
        bank, rows, scores = original(data, bb, splits, P, cfg, bank_dir, on_shard=on_shard)
        from covtoken.eval.labels import token_lesion_fraction

        pool = np.concatenate([rows["calib"], rows["test"]])
        frac = token_lesion_fraction(data.masks, [bank.image_ids[i] for i in pool], bank.grid)
        return bank, rows, scores + 1e-9 * frac

    monkeypatch.setattr(job, "label_free_stage", leaky)
