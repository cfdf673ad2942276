"""covtoken.data.busi and covtoken.data.lidc: adapters for the real samples, and their failure cases."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covtoken.data.busi import load_busi
from covtoken.data.layout import SealedMask
from covtoken.data.lidc import load_lidc, robust_unit_scale


def _peek(mask: SealedMask) -> np.ndarray:
    return mask._array  # test-only look at the sealed mask, to check the adapter put the right pixels in it


def _busi(
    tmp_path: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], *, extra: dict[str, dict] | None = None
) -> Path:
    root = tmp_path / "busi"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for stem, (img, mask) in cases.items():
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}_mask.png")
        row = {"file": f"images/{stem}.png", "mask": f"masks/{stem}_mask.png", "label": "benign"}
        rows.append({**row, **(extra or {}).get(stem, {})})
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return root


def _pair(h: int = 12, w: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[3:6, 2:5] = 255
    return img, mask


def test_busi_loads_grey_masks_and_stem_patients(tmp_path: Path) -> None:
    a, b = _pair(seed=1), _pair(seed=2)
    rgb = np.repeat(b[0][..., None], 3, axis=2)
    root = _busi(tmp_path, {"benign_1": a, "benign_2": (rgb, b[1])})
    items, masks = load_busi(root)
    assert [it.image_id for it in items] == ["benign_1", "benign_2"]
    assert [it.patient_id for it in items] == ["benign_1", "benign_2"]
    np.testing.assert_allclose(items[0].image, a[0] / 255.0, atol=1e-7)
    np.testing.assert_allclose(items[1].image, b[0] / 255.0, atol=1e-7)  # identical RGB channels -> one channel
    np.testing.assert_array_equal(_peek(masks["benign_1"]), a[1] > 0)
    assert "diagnosis" not in items[0].meta and "mask_empty" not in items[0].meta  # labels stay sealed
    assert masks["benign_1"]._labels == {"diagnosis": "benign"}


def test_busi_grey_image_with_coloured_marks_uses_luma(tmp_path: Path) -> None:
    img, mask = _pair(20, 20)
    rgb = np.repeat(img[..., None], 3, axis=2).astype(np.uint8)
    rgb[0, :10] = (255, 0, 0)  # a red caliper mark on 10 of 400 pixels, as on real BUSI images
    items, _ = load_busi(_busi(tmp_path, {"x": (rgb, mask)}))
    expected = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    np.testing.assert_allclose(items[0].image, expected, atol=1e-7)


def test_busi_refuses_colour_content_naming_file_and_row(tmp_path: Path) -> None:
    from covtoken.data.errors import DatasetIdentityError

    img, mask = _pair()
    rgb = np.stack([img, 255 - img, img // 2], axis=2).astype(np.uint8)  # dermoscopy-like: every pixel coloured
    with pytest.raises(DatasetIdentityError, match=r"index\.csv:2: .*x\.png: \d+% of pixels are coloured"):
        load_busi(_busi(tmp_path, {"x": (rgb, mask)}))


def test_busi_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    img, _ = _pair(12, 10)
    _, mask = _pair(12, 11)
    with pytest.raises(ValueError, match=r"x_mask\.png: mask shape \(12, 11\).*x\.png shape \(12, 10\)"):
        load_busi(_busi(tmp_path, {"x": (img, mask)}))


def test_busi_empty_mask_is_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img, mask = _pair()
    with caplog.at_level(logging.WARNING, logger="covtoken.data.busi"):
        items, masks = load_busi(_busi(tmp_path, {"normal_1": (img, np.zeros_like(mask)), "b": (img, mask)}))
    assert "normal_1_mask.png: empty mask" in caplog.text
    assert not _peek(masks["normal_1"]).any()


def test_busi_all_lesion_mask_is_an_error(tmp_path: Path) -> None:
    img, mask = _pair()
    with pytest.raises(ValueError, match=r"x_mask\.png: mask covers the whole image"):
        load_busi(_busi(tmp_path, {"x": (img, np.full_like(mask, 255))}))


def test_busi_non_binary_mask_is_an_error(tmp_path: Path) -> None:
    img, mask = _pair()
    mask[0, 0] = 128
    with pytest.raises(ValueError, match=r"x_mask\.png: mask is not binary"):
        load_busi(_busi(tmp_path, {"x": (img, mask)}))


def test_busi_corrupt_and_truncated_png_name_the_file(tmp_path: Path) -> None:
    root = _busi(tmp_path, {"x": _pair(64, 64), "y": _pair(64, 64)})
    (root / "images" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"images/x\.png: cannot decode image"):
        load_busi(root)
    _pair_img, _ = _pair(64, 64, seed=5)
    Image.fromarray(_pair_img).save(root / "images" / "x.png")
    raw = (root / "masks" / "y_mask.png").read_bytes()
    (root / "masks" / "y_mask.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"y_mask\.png: cannot decode image"):
        load_busi(root)


def test_busi_missing_patient_id_and_bad_index(tmp_path: Path) -> None:
    root = _busi(tmp_path, {"x": _pair(), "y": _pair()}, extra={"x": {"patient_id": "P1"}, "y": {"patient_id": ""}})
    with pytest.raises(ValueError, match=r"index\.csv:3: missing patient id"):
        load_busi(root)
    root2 = _busi(tmp_path / "b", {"x": _pair()}, extra={"x": {"h": "99", "w": "10"}})
    with pytest.raises(ValueError, match=r"x\.png: shape \(12, 10\).*h=99"):
        load_busi(root2)
    (root2 / "index.csv").write_text("file,label\nimages/x.png,benign\n")
    with pytest.raises(ValueError, match=r"missing columns \['mask'\]"):
        load_busi(root2)


@pytest.mark.realdata
def test_busi_real_sample(realdata: Path) -> None:
    items, masks = load_busi(realdata / "busi")
    rows = {Path(r["file"]).stem: r for r in csv.DictReader(open(realdata / "busi" / "index.csv"))}
    assert len(items) == len(rows) == len(masks)
    for it in items:
        r = rows[it.image_id]
        assert it.image.shape == (int(r["h"]), int(r["w"])) and it.image.ndim == 2
        assert 0.0 <= it.image.min() and it.image.max() <= 1.0 and it.image.max() > 0.5
        assert _peek(masks[it.image_id]).mean() == pytest.approx(float(r["lesion_frac"]), abs=6e-5)
        assert masks[it.image_id]._labels["diagnosis"] == r["label"] and "diagnosis" not in it.meta
    assert len({it.patient_id for it in items}) == len(items)


def _lidc(tmp_path: Path, images: np.ndarray, masks: np.ndarray, rows: list[dict]) -> Path:
    root = tmp_path / "lidc"
    root.mkdir(exist_ok=True)
    np.savez_compressed(root / "lidc_nodule_slices.npz", images=images, masks=masks)
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["patient", "image", "mask_pixels"])
        w.writeheader()
        w.writerows(rows)
    return root


def _lidc_data(n: int = 3, size: int = 16) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rng = np.random.default_rng(3)
    images = rng.normal(0, 1, (n, size, size)).astype(np.float16)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        masks[i, 4:7 + i, 5:8] = True
    rows = [{"patient": f"LIDC-IDRI-000{i // 2 + 1}", "image": f"s{i}", "mask_pixels": int(masks[i].sum())}
            for i in range(n)]
    return images, masks, rows


def test_lidc_scales_each_slice_robustly(tmp_path: Path) -> None:
    images, masks, rows = _lidc_data()
    items, sealed = load_lidc(_lidc(tmp_path, images, masks, rows))
    assert [it.patient_id for it in items] == ["LIDC-IDRI-0001", "LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    for i, it in enumerate(items):
        x = images[i].astype(np.float32)
        lo, hi = np.percentile(x, 0.5), np.percentile(x, 99.5)
        np.testing.assert_allclose(it.image, np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-6)
        np.testing.assert_array_equal(_peek(sealed[it.image_id]), masks[i])
        assert it.spacing_mm is None and it.modality == "CT"
    ramp = np.arange(1000, dtype=np.float32).reshape(10, 100)
    scaled, lo, hi = robust_unit_scale(ramp)
    assert lo == pytest.approx(4.995) and hi == pytest.approx(994.005)
    assert scaled.min() == 0.0 and scaled.max() == 1.0


def test_lidc_failure_cases(tmp_path: Path) -> None:
    images, masks, rows = _lidc_data()
    bad_rows = [dict(r) for r in rows]
    bad_rows[1]["patient"] = ""
    with pytest.raises(ValueError, match=r"index\.csv:3: missing patient id"):
        load_lidc(_lidc(tmp_path, images, masks, bad_rows))
    with pytest.raises(ValueError, match=r"index\.csv: 2 rows but .*3 slices"):
        load_lidc(_lidc(tmp_path, images, masks, rows[:2]))
    with pytest.raises(ValueError, match=r"images \(3, 16, 16\) and masks \(3, 16, 15\)"):
        load_lidc(_lidc(tmp_path, images, masks[:, :, :15], rows))
    full = masks.copy()
    full[2] = True
    rows_full = [dict(r) for r in rows]
    rows_full[2]["mask_pixels"] = full[2].sum()
    with pytest.raises(ValueError, match=r"\[masks\]\[2\]: mask covers the whole image"):
        load_lidc(_lidc(tmp_path, images, full, rows_full))
    off = [dict(r) for r in rows]
    off[0]["mask_pixels"] = 1
    with pytest.raises(ValueError, match="index out of sync"):
        load_lidc(_lidc(tmp_path, images, masks, off))
    flat = images.copy()
    flat[1] = 0
    with pytest.raises(ValueError, match=r"npz\[1\]: .*constant slice"):
        load_lidc(_lidc(tmp_path, flat, masks, rows))


def test_lidc_empty_mask_flagged_and_corrupt_archive(tmp_path: Path) -> None:
    images, masks, rows = _lidc_data()
    masks[0] = False
    rows[0]["mask_pixels"] = 0
    root = _lidc(tmp_path, images, masks, rows)
    items, sealed = load_lidc(root)
    assert [bool(_peek(sealed[it.image_id]).any()) for it in items] == [False, True, True]
    raw = (root / "lidc_nodule_slices.npz").read_bytes()
    (root / "lidc_nodule_slices.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"lidc_nodule_slices\.npz: cannot read archive"):
        load_lidc(root)
    (root / "lidc_nodule_slices.npz").write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match=r"lidc_nodule_slices\.npz: cannot read archive"):
        load_lidc(root)


@pytest.mark.realdata
def test_lidc_real_sample(realdata: Path) -> None:
    items, masks = load_lidc(realdata / "lidc_idri")
    rows = list(csv.DictReader(open(realdata / "lidc_idri" / "index.csv")))
    assert [it.image_id for it in items] == [r["image"] for r in rows]
    assert [it.patient_id for it in items] == [r["patient"] for r in rows]
    assert len({it.patient_id for it in items}) == 5
    for it, r in zip(items, rows):
        assert it.image.shape == (512, 512) and 0.0 <= it.image.min() and it.image.max() <= 1.0
        assert int(_peek(masks[it.image_id]).sum()) == int(r["mask_pixels"])
