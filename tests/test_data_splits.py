"""covtoken.data.splits: deterministic patient-level splits, leak checks, manifest digest."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import numpy as np
import pytest

from covtoken.data.layout import ImageItem
from covtoken.data.splits import SplitLeakError, SplitManifest, split_patients, validate_splits

FR = {"train": 0.6, "val": 0.2, "test": 0.2}


def _item(iid: str, pid: str) -> ImageItem:
    return ImageItem(image=np.zeros((4, 4), np.float32), image_id=iid, patient_id=pid, modality="US")


def test_split_is_a_patient_partition_with_requested_sizes() -> None:
    ids = [f"P{i:03d}" for i in range(53)]
    s = split_patients(ids + ids[:10], fractions=FR, seed=3)  # several images per patient: ids repeat
    assert set(s) == set(FR)
    assert set().union(*s.values()) == set(ids)
    assert sum(len(v) for v in s.values()) == len(ids)
    for k, f in FR.items():
        assert abs(len(s[k]) - f * len(ids)) <= 1, (k, len(s[k]))


def test_split_is_deterministic_and_independent_of_input_order() -> None:
    ids = [f"case_{i}" for i in range(40)]
    a = split_patients(ids, fractions=FR, seed=11)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert split_patients(shuffled, fractions=FR, seed=11) == a
    assert split_patients(ids, fractions=FR, seed=11) == a
    assert split_patients(ids, fractions=FR, seed=12) != a


def test_stratified_split_keeps_label_proportions() -> None:
    ids = [f"P{i}" for i in range(60)]
    strata = {p: ("malignant" if i < 15 else "benign") for i, p in enumerate(ids)}
    s = split_patients(ids, fractions={"train": 0.6, "test": 0.4}, seed=5, strata=strata)
    per = {k: Counter(strata[p] for p in v) for k, v in s.items()}
    assert per["train"] == {"malignant": 9, "benign": 27}
    assert per["test"] == {"malignant": 6, "benign": 18}


def test_every_positive_split_gets_a_patient() -> None:
    s = split_patients(["a", "b", "c"], fractions={"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert all(len(v) == 1 for v in s.values())
    with pytest.raises(ValueError, match="cannot fill"):
        split_patients(["a", "b"], fractions=FR, seed=0)


@pytest.mark.parametrize("bad", [{"train": 0.7, "test": 0.2}, {"train": 1.2, "test": -0.2}])
def test_bad_fractions_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_patients(["a", "b", "c"], fractions=bad, seed=0)


def test_validate_splits_names_the_leaking_id_and_both_splits() -> None:
    items = [_item("i1", "A"), _item("i2", "B"), _item("i3", "C")]
    with pytest.raises(SplitLeakError, match=r"patient 'A' is in split 'train' and in split 'test'"):
        validate_splits({"train": {"A", "B"}, "test": {"A", "C"}}, items)
    lesions = {"i1": "L1", "i2": "L1"}
    with pytest.raises(ValueError, match=r"lesion 'L1' is in split 'train' and in split 'test'"):
        validate_splits({"train": {"A"}, "test": {"B", "C"}}, items, lesion_ids=lesions)
    validate_splits({"train": {"A", "B"}, "test": {"C"}}, items, lesion_ids=lesions)
    with pytest.raises(SplitLeakError, match="patient 'C' is in no split"):
        validate_splits({"train": {"A", "B"}}, items)


def test_split_output_passes_validation() -> None:
    items = [_item(f"i{j}", f"P{j // 3}") for j in range(30)]
    s = split_patients([it.patient_id for it in items], fractions=FR, seed=1)
    validate_splits(s, items, lesion_ids={it.image_id: f"L{it.patient_id}" for it in items})


def test_manifest_digest_tracks_membership() -> None:
    s = split_patients([f"P{i}" for i in range(10)], fractions=FR, seed=2)
    d = SplitManifest(seed=2, fractions=FR, membership=s).to_dict()
    json.dumps(d, allow_nan=False)
    canon = json.dumps({k: sorted(v) for k, v in s.items()}, sort_keys=True)
    assert d["membership_sha256"] == hashlib.sha256(canon.encode()).hexdigest()
    assert d["seed"] == 2 and d["fractions"] == FR and d["membership"] == {k: sorted(v) for k, v in s.items()}
    moved = {k: set(v) for k, v in s.items()}
    p = sorted(moved["train"])[0]
    moved["train"].remove(p)
    moved["test"].add(p)
    moved_digest = SplitManifest(seed=2, fractions=FR, membership=moved).to_dict()["membership_sha256"]
    assert moved_digest != d["membership_sha256"]
