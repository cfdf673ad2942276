"""HAM10000 / ISIC 2018 adapter on small files made here (no real sample is shipped)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covtoken.data.catalog import load_dataset
from covtoken.data.ham10000 import load_ham10000
from covtoken.data.splits import split_patients, validate_splits
from sealed_access import mask_labels

ROWS = [("HAM_0000001", "ISIC_0000001", "nv", "back"), ("HAM_0000001", "ISIC_0000002", "nv", "back"),
        ("HAM_0000002", "ISIC_0000003", "mel", "face")]


def make(root: Path, rows=ROWS, *, mask_shape=(20, 30), skip_mask: str | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        for lid, iid, dx, site in rows:
            w.writerow([lid, iid, dx, "histo", "50.0", "male", site])
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "images" / f"{iid}.jpg", quality=95)
            if iid != skip_mask:
                m = np.zeros(mask_shape, np.uint8)
                m[5:10, 5:12] = 255
                Image.fromarray(m).save(root / "masks" / f"{iid}_segmentation.png")
    return root


def test_loads_with_lesion_as_unit_and_sealed_diagnosis(tmp_path):
    items, masks = load_ham10000(make(tmp_path / "h"))
    assert [i.patient_id for i in items] == ["HAM_0000001", "HAM_0000001", "HAM_0000002"]
    assert items[0].image.shape == (20, 30, 3) and 0 <= items[0].image.min() and items[0].image.max() <= 1
    assert "dx" not in items[0].meta and items[2].meta["site"] == "face"
    assert mask_labels(masks["ISIC_0000003"])["dx"] == "mel"
    # the two images of one lesion always land in the same split
    splits = split_patients([i.patient_id for i in items], fractions={"a": 0.5, "b": 0.5}, seed=0)
    validate_splits(splits, items, lesion_ids={i.image_id: i.meta["lesion_id"] for i in items})
    d = load_dataset("ham10000", root=tmp_path / "h")
    assert d.provenance["revision"].startswith("sha256:") and len(d.items) == 3


@pytest.mark.parametrize("case,match", [
    ("bad_dx", "unknown dx"), ("dup", "duplicate image_id"), ("no_mask", "no task-1 mask"),
    ("shape", "does not match"), ("corrupt", "cannot decode"), ("empty_lesion", "empty image_id or lesion_id"),
])
def test_bad_input_names_the_file(tmp_path, case, match):
    rows = list(ROWS)
    kw = {}
    if case == "bad_dx":
        rows[1] = ("HAM_0000001", "ISIC_0000002", "cancer", "back")
    elif case == "dup":
        rows[2] = ("HAM_0000002", "ISIC_0000002", "mel", "face")
    elif case == "no_mask":
        kw["skip_mask"] = "ISIC_0000003"
    elif case == "shape":
        kw["mask_shape"] = (21, 30)
    elif case == "empty_lesion":
        rows[0] = ("", "ISIC_0000001", "nv", "back")
    root = make(tmp_path / "h", rows, **kw) if case != "dup" else None
    if case == "dup":
        root = make(tmp_path / "h", rows[:2])
        with open(root / "HAM10000_metadata.csv", "a", newline="") as fh:
            csv.writer(fh).writerow(["HAM_0000002", "ISIC_0000002", "mel", "histo", "50", "male", "face"])
    if case == "corrupt":
        f = root / "images" / "ISIC_0000002.jpg"
        f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ValueError, match=match) as err:
        load_ham10000(root)
    assert str(root) in str(err.value)
