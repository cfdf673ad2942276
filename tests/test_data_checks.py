"""Split hygiene, dataset identity, folder adapter and the data checks that run before any backbone work.

Each test builds the situation that should be refused (or grouped) and checks that it is; the attacks are the
tests: near-duplicates planted across patients, conflicting labels, dermoscopy given as ultrasound, a split with
one judged patient, an Excel CSV, a broken row, BUSI's own folder layout with a second mask.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from covtoken.data.catalog import LoadedDataset, load_dataset
from covtoken.data.checks import check_split_sizes, min_patients_rule, run_data_checks
from covtoken.data.dedup import NearDuplicateParams, group_near_duplicates, validate_groups
from covtoken.data.errors import DataError, DatasetIdentityError, TooFewPatientsError
from covtoken.data.identity import content_digest, is_registered_sample
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask
from covtoken.data.splits import SplitLeakError, split_patients


def _smooth(seed: int, size: int = 64) -> np.ndarray:
    """A structured grey image in [0, 1] (smoothed noise: pHash sees its layout, not pixel noise)."""
    img = gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 4)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def _dataset(specs: list[tuple[str, str, np.ndarray, str]]) -> LoadedDataset:
    """Items from (image id, patient id, image, label)."""
    items = [ImageItem(image=img, image_id=i, patient_id=p, modality="US", source=i) for i, p, img, _ in specs]
    masks = {}
    for i, _, img, lab in specs:
        m = np.zeros(img.shape, dtype=bool)
        m[5:15, 5:15] = True
        masks[i] = SealedMask(m, source=i, labels={"diagnosis": lab})
    return LoadedDataset(items, EvalMasks(masks, items), {"id": "constructed", "revision": "x"})


def _with_planted_duplicates(n: int = 40) -> tuple[LoadedDataset, list[tuple[str, str]]]:
    """``n`` distinct patients; patient k+1 of each planted pair holds a slightly noisier, brighter copy of k's image."""
    rng = np.random.default_rng(99)
    specs, planted = [], []
    for k in range(n):
        specs.append((f"img{k:02d}", f"P{k:02d}", _smooth(k), "benign"))
    for k in (0, 10, 20):  # plant: image of patient k+1 replaced by a near copy of patient k's image
        near = np.clip(_smooth(k) * 0.95 + 0.03 + rng.normal(0, 0.01, (64, 64)), 0, 1).astype(np.float32)
        specs[k + 1] = (f"img{k + 1:02d}", f"P{k + 1:02d}", near, "benign")
        planted.append((f"P{k:02d}", f"P{k + 1:02d}"))
    return _dataset(specs), planted


def test_planted_near_duplicates_are_grouped_and_their_patients_become_one_unit() -> None:
    data, planted = _with_planted_duplicates()
    rep = group_near_duplicates(data.items)
    assert sorted(rep.groups) == sorted([[f"img{int(a[1:]):02d}", f"img{int(b[1:]):02d}"] for a, b in planted])
    for a, b in planted:
        assert rep.unit_of[a] == rep.unit_of[b] == f"{a}+{b}"
    assert len(set(rep.unit_of.values())) == 40 - len(planted)
    assert all(c > 0.95 for *_, c in rep.pairs)  # the eye-free check: linked pairs really look alike


@pytest.mark.parametrize("seed", range(5))
def test_split_over_units_keeps_groups_together_and_a_straddling_split_is_refused(seed: int) -> None:
    data, planted = _with_planted_duplicates()
    checked = run_data_checks(data, {"split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25},
                                     "min_patients_per_judged_split": 5}, seed=seed, dataset="c", embedded=False)
    rep = group_near_duplicates(checked.items)  # hashes do not change: same groups
    splits = split_patients([it.patient_id for it in checked.items], fractions={"train": 0.5, "val": 0.25,
                                                                                "test": 0.25}, seed=seed)
    validate_groups(splits, checked.items, rep.groups)  # units keep each group in one split
    assert checked.provenance["near_duplicates"]["n_groups"] == 3
    assert {it.meta.get("source_patient_id") for it in checked.items} >= {a for a, _ in planted}
    # the same images split by *source* patient, with one pair forced apart, are refused
    a, b = planted[0]
    naive = {"train": {a} | {f"P{k:02d}" for k in range(2, 40)}, "test": {b}}
    with pytest.raises(SplitLeakError, match="straddle two splits"):
        validate_groups(naive, data.items, rep.groups)


def test_grouping_ignores_labels_and_flags_groups_with_conflicting_labels() -> None:
    data, planted = _with_planted_duplicates()
    specs = [(it.image_id, it.patient_id, it.image, "malignant" if it.patient_id == planted[1][1] else "benign")
             for it in data.items]
    conflicted = _dataset(specs)
    checked = run_data_checks(conflicted, {"min_patients_per_judged_split": 2}, seed=0, dataset="c", embedded=False)
    nd = checked.provenance["near_duplicates"]
    assert nd["n_label_conflicts"] == 1
    assert nd["label_conflict_groups"] == [["img10", "img11"]]
    # units are identical whatever the labels say
    plain = run_data_checks(data, {"min_patients_per_judged_split": 2}, seed=0, dataset="c", embedded=False)
    assert [i.patient_id for i in plain.items] == [i.patient_id for i in checked.items]
    assert plain.provenance["near_duplicates"]["n_label_conflicts"] == 0


def test_pair_search_matches_the_obvious_loop_and_imagehash_distance() -> None:
    import imagehash

    from covtoken.data.dedup import image_hashes, near_duplicate_pairs

    rng = np.random.default_rng(0)
    h = rng.random((300, 64)) < 0.5
    h[7] = h[5]
    h[9] = h[3] ^ (rng.random(64) < 0.05)
    got = set(near_duplicate_pairs(h, max_hamming=10, chunk=64))  # chunks that do not divide n
    ref = {(i, j, int((h[i] != h[j]).sum())) for i in range(300) for j in range(i + 1, 300)
           if (h[i] != h[j]).sum() <= 10}
    assert got == ref and (5, 7, 0) in got
    data, _ = _with_planted_duplicates()
    hs = image_hashes(data.items[:2])
    a = imagehash.ImageHash(hs[0].reshape(8, 8))
    b = imagehash.ImageHash(hs[1].reshape(8, 8))
    assert (a - b) == int((hs[0] != hs[1]).sum())


def test_threshold_is_read_from_the_locked_parameter_and_bad_values_fail() -> None:
    data, _ = _with_planted_duplicates()
    none = run_data_checks(data, {"near_duplicate": {"method": "phash", "hash_size": 8, "max_hamming": 0}},
                           seed=0, dataset="c", embedded=False)
    loose = run_data_checks(data, {}, seed=0, dataset="c", embedded=False)
    assert loose.provenance["near_duplicates"]["max_hamming"] == 6  # the pre-registered default
    assert none.provenance["near_duplicates"]["n_groups"] <= loose.provenance["near_duplicates"]["n_groups"]
    for bad in ({"method": "ahash"}, {"max_hamming": -1}, {"hash_size": 8, "max_hamming": 40}, {"maxhamming": 3}):
        with pytest.raises(ValueError, match="near_duplicate"):
            NearDuplicateParams.from_mapping(bad)


def test_phantoms_report_groups_without_merging_patients() -> None:
    data = load_dataset("phantom-kidney", seed=0, n_patients=8, per_patient=2)
    checked = run_data_checks(data, {"split_fractions": {"train": 0.5, "test": 0.5}}, seed=0, dataset="phantom-kidney",
                              embedded=True)
    assert [i.patient_id for i in checked.items] == [i.patient_id for i in data.items]
    assert checked.provenance["near_duplicates"]["applied"] is False


def test_min_patients_rule_and_split_size_check() -> None:
    assert min_patients_rule({"min_patients_per_judged_split": 20}) == (20, None)
    value, warning = min_patients_rule({})
    assert value == 2 and "hard minimum" in warning
    for bad in (1, 2.5, "10", True):
        with pytest.raises(DataError, match="min_patients_per_judged_split"):
            min_patients_rule({"min_patients_per_judged_split": bad})
    splits = {"train": frozenset("abcdef"), "val": frozenset("gh"), "test": frozenset("i")}
    with pytest.raises(TooFewPatientsError, match=r"judged split 'test' has 1 patient\(s\)"):
        check_split_sizes(splits, minimum=2, judged=["val", "test"], dataset="d")
    check_split_sizes(splits, minimum=1, judged=["val", "test"], dataset="d")


# ------------------------------------------------------------------------------------------- identity, digest
def _write_png_folder(root: Path, images: dict[str, np.ndarray], mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, img in images.items():
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}_mask.png")


def _dermoscopy(seed: int, h: int = 24, w: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    skin = np.array([200, 150, 120]) + rng.normal(0, 10, (h, w, 3))  # skin tones: every pixel coloured
    return np.clip(skin, 0, 255).astype(np.uint8)


def test_colour_dermoscopy_given_as_busi_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "derm"
    mask = np.zeros((24, 20), np.uint8)
    mask[5:10, 5:10] = 255
    _write_png_folder(root, {f"benign_{k}": _dermoscopy(k) for k in range(1, 4)}, mask)
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "mask", "label"])
        for k in range(1, 4):
            w.writerow([f"images/benign_{k}.png", f"masks/benign_{k}_mask.png", "benign"])
    with pytest.raises(DatasetIdentityError, match=r"benign_1\.png: \d+% of pixels are coloured.*greyscale"):
        load_dataset("busi", root=root)


def test_catalog_identity_refuses_wrong_names_count_and_grey_dermoscopy() -> None:
    from covtoken.data.identity import IDENTITIES, check_identity

    grey = [ImageItem(image=_smooth(k), image_id=f"ISIC_{k:07d}", patient_id=f"L{k}", modality="dermoscopy",
                      source=f"ISIC_{k:07d}.jpg") for k in range(3)]
    with pytest.raises(DatasetIdentityError, match=r"ISIC_0000000\.jpg: greyscale content"):
        check_identity("ham10000", [ImageItem(image=np.repeat(it.image[..., None], 3, 2), image_id=it.image_id,
                                              patient_id=it.patient_id, modality=it.modality, source=it.source)
                                    for it in grey], IDENTITIES["ham10000"])
    us = [ImageItem(image=_smooth(k), image_id=f"scan{k}", patient_id=f"P{k}", modality="US", source=f"scan{k}.png")
          for k in range(3)]
    with pytest.raises(DatasetIdentityError, match=r"scan0\.png: image id 'scan0' does not match busi"):
        check_identity("busi", us, IDENTITIES["busi"])
    with pytest.raises(DatasetIdentityError, match="modality 'US', but lidc is CT"):
        check_identity("lidc", [ImageItem(image=_smooth(0), image_id="a", patient_id="LIDC-IDRI-0001",
                                          modality="US")], IDENTITIES["lidc"])
    many = [ImageItem(image=_smooth(0), image_id=f"benign_{k}", patient_id=str(k), modality="US")
            for k in range(781)]
    with pytest.raises(DatasetIdentityError, match="781 images, but busi has between 1 and 780"):
        check_identity("busi", many, IDENTITIES["busi"])


def test_content_digest_tracks_file_bytes_and_registered_samples_need_the_exact_content(tmp_path: Path) -> None:
    mask = np.zeros((24, 20), np.uint8)
    imgs = {f"benign_{k}": (_smooth(k, 24)[:, :20] * 255).astype(np.uint8) for k in range(1, 3)}
    _write_png_folder(tmp_path / "a", imgs, mask)
    _write_png_folder(tmp_path / "b", imgs, mask)
    items = lambda r: [ImageItem(image=np.zeros((2, 2), np.float32), image_id=p.stem, patient_id=p.stem,  # noqa: E731
                                 modality="US", source=str(p)) for p in sorted((r / "images").glob("*.png"))]
    da, _ = content_digest(items(tmp_path / "a"), tmp_path / "a")
    db, _ = content_digest(items(tmp_path / "b"), tmp_path / "b")
    assert da == db  # same files, other folder: same digest
    imgs["benign_2"][0, 0] ^= 1
    Image.fromarray(imgs["benign_2"]).save(tmp_path / "b" / "images" / "benign_2.png")
    assert content_digest(items(tmp_path / "b"), tmp_path / "b")[0] != da
    assert not is_registered_sample("busi", da)
    assert not is_registered_sample({"catalog_name": "busi", "content_digest": da, "registered_sample": "busi-sample"})


@pytest.mark.realdata
def test_the_realdata_busi_folder_is_the_registered_sample(realdata: Path) -> None:
    d = load_dataset("busi", root=realdata / "busi")
    assert d.provenance["registered_sample"] == "busi-sample"
    assert is_registered_sample(d.provenance)
    assert not is_registered_sample({**d.provenance, "catalog_name": "lidc"})


# ----------------------------------------------------------------------------- CSV, BUSI layout, folder adapter
def test_busi_index_with_bom_normal_row_without_mask_and_row_numbered_errors(tmp_path: Path) -> None:
    root = tmp_path / "busi"
    mask = np.zeros((24, 20), np.uint8)
    mask[3:8, 3:8] = 255
    imgs = {f"{c}_{k}": (_smooth(10 * k + len(c), 24)[:, :20] * 255).astype(np.uint8)
            for c, k in (("benign", 1), ("normal", 1), ("malignant", 1))}
    _write_png_folder(root, imgs, mask)
    rows = [["file", "mask", "label"], ["images/benign_1.png", "masks/benign_1_mask.png", "benign"],
            ["images/normal_1.png", "", "normal"], ["images/malignant_1.png", "masks/malignant_1_mask.png", "malignant"]]
    (root / "index.csv").write_text("\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8-sig")  # Excel BOM
    assert (root / "index.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    d = load_dataset("busi", root=root)
    assert len(d.items) == 3 and d.provenance["n_lesion_free_images"] == 1
    # an empty mask cell outside a 'normal' row, and a missing image: errors name the table and the line
    rows[3][1] = ""
    (root / "index.csv").write_text("\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8-sig")
    with pytest.raises(DataError, match=r"index\.csv:4: empty 'mask' cell .*malignant_1\.png"):
        load_dataset("busi", root=root)
    rows[3] = ["images/missing.png", "masks/malignant_1_mask.png", "malignant"]
    (root / "index.csv").write_text("\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8-sig")
    with pytest.raises(DataError, match=r"index\.csv:4: .*missing\.png: no such file"):
        load_dataset("busi", root=root)


def test_busi_original_layout_merges_mask_1_as_a_union(tmp_path: Path) -> None:
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        (root / cls).mkdir(parents=True)
    img = (_smooth(1, 24)[:, :20] * 255).astype(np.uint8)
    m0, m1 = np.zeros((24, 20), np.uint8), np.zeros((24, 20), np.uint8)
    m0[2:6, 2:6], m1[12:18, 10:15] = 255, 255
    Image.fromarray(img).save(root / "benign" / "benign (7).png")
    Image.fromarray(m0).save(root / "benign" / "benign (7)_mask.png")
    Image.fromarray(m1).save(root / "benign" / "benign (7)_mask_1.png")
    Image.fromarray((_smooth(2, 24)[:, :20] * 255).astype(np.uint8)).save(root / "normal" / "normal (1).png")
    Image.fromarray(np.zeros((24, 20), np.uint8)).save(root / "normal" / "normal (1)_mask.png")
    d = load_dataset("busi", root=tmp_path)
    assert [i.image_id for i in d.items] == ["benign_7", "normal_1"]
    assert d.provenance["n_lesion_free_images"] == 1
    got = d.masks["benign_7"]._array  # test-only look inside the sealed mask
    np.testing.assert_array_equal(got, (m0 > 0) | (m1 > 0))
    Image.fromarray(m1).save(root / "malignant" / "malignant (3)_mask.png")
    with pytest.raises(DataError, match=r"malignant \(3\)_mask\.png: mask without its image"):
        load_dataset("busi", root=tmp_path)


def _folder_dataset(root: Path, *, info: dict | None, index: list[list[str]] | None) -> Path:
    mask = np.zeros((24, 20), np.uint8)
    mask[3:8, 3:8] = 255
    _write_png_folder(root, {f"im{k}": (_smooth(k, 24)[:, :20] * 255).astype(np.uint8) for k in range(3)}, mask)
    if info is not None:
        (root / "dataset.json").write_text(json.dumps(info))
    if index is not None:
        (root / "index.csv").write_text("\n".join(",".join(r) for r in index) + "\n", encoding="utf-8-sig")
    return root


def test_generic_folder_adapter_keeps_labels_patients_name_and_licence(tmp_path: Path) -> None:
    from covtoken.data.layout import unseal_labels  # noqa: F401 (the data layer reads labels; tests peek below)

    index = [["file", "mask", "patient_id", "dx"], ["images/im0.png", "masks/im0_mask.png", "A", "mel"],
             ["images/im1.png", "", "A", "nv"], ["images/im2.png", "masks/im2_mask.png;masks/im1_mask.png", "B", "nv"]]
    root = _folder_dataset(tmp_path / "f", info={"name": "my-us", "licence": "CC-BY-4.0", "modality": "US"},
                           index=index)
    d = load_dataset("folder", root=root)
    assert d.provenance["id"] == "folder:my-us" and d.provenance["licence"] == "CC-BY-4.0"
    assert [i.patient_id for i in d.items] == ["A", "A", "B"] and d.provenance["n_lesion_free_images"] == 1
    assert d.masks["im0"]._labels == {"dx": "mel"}
    index[2][2] = ""
    (root / "index.csv").write_text("\n".join(",".join(r) for r in index) + "\n")
    with pytest.raises(DataError, match=r"index\.csv:3: empty patient_id"):
        load_dataset("folder", root=root)


def test_folder_adapter_without_index_and_without_dataset_json(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "f", info=None, index=None)
    with pytest.raises(DataError, match=r"dataset\.json: missing"):
        load_dataset("folder", root=root)
    (root / "dataset.json").write_text(json.dumps({"name": "x", "licence": "CC0-1.0", "modality": "dermoscopy",
                                                   "channels": "colour"}))
    with pytest.raises(DatasetIdentityError, match="greyscale content"):
        load_dataset("folder", root=root)  # grey images declared as colour dermoscopy
    (root / "dataset.json").write_text(json.dumps({"name": "x", "licence": "CC0-1.0", "modality": "US"}))
    assert len(load_dataset("folder", root=root).items) == 3


def test_plain_image_folder_as_a_source_gives_a_hint_not_a_builder_error(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "plain", info=None, index=None)
    with pytest.raises(DataError, match=r"--dataset folder --data-root"):
        load_dataset(str(root))


# ----------------------------------------------------------------------------------- the job stops before compute
@pytest.mark.slow
def test_one_patient_judged_split_stops_g1_before_any_backbone_or_token_work(tmp_path: Path, monkeypatch,
                                                                           capsys) -> None:
    import covtoken.backbone.frozen as frozen
    from g1_helpers import load_job

    root = tmp_path / "busi"
    mask = np.zeros((32, 32), np.uint8)
    mask[4:10, 4:10] = 255
    _write_png_folder(root, {f"benign_{k}": (_smooth(100 + k, 32) * 255).astype(np.uint8) for k in range(1, 5)}, mask)
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "mask", "label"])
        for k in range(1, 5):
            w.writerow([f"images/benign_{k}.png", f"masks/benign_{k}_mask.png", "benign"])

    def no_backbone(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("a backbone was built although the data checks should have stopped the job")

    monkeypatch.setattr(frozen, "load_backbone", no_backbone)
    work, results = tmp_path / "work", tmp_path / "results"
    rc = load_job("g1_lesion_subspace").main(["--dataset", "busi", "--data-root", str(root), "--lock-entry",
                                               "G1/sample", "--results", str(results), "--work-dir", str(work)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "judged split" in err and "patient(s)" in err and "min_patients_per_judged_split" in err
    assert not work.exists() or not any(work.rglob("*"))  # no token bank folder
    assert not results.exists() or not list(results.rglob("*.json"))  # no record
