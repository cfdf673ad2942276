"""covtoken.data.hub: source parsing, imagefolder round trip through datasets.load_dataset, one code path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covtoken.data import hub
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask
from sealed_access import mask_array


def _peek(mask: SealedMask) -> np.ndarray:
    return mask_array(mask)  # test-only look at the sealed mask, to check the right pixels came back


def _items() -> tuple[list[ImageItem], EvalMasks]:
    rng = np.random.default_rng(7)
    items, masks = [], {}
    specs = [("us/1", "P1", "US", (20, 24), None), ("us/2", "P1", "US", (18, 24), (0.1, 0.12)),
             ("ct 3", "P2", "CT", (16, 16), (0.7, 0.7)), ("derm-4", "P3", "dermoscopy", (12, 14, 3), None)]
    for iid, pid, mod, shape, spacing in specs:
        img = rng.uniform(0, 1, shape).astype(np.float32)
        img.flat[0], img.flat[1] = 0.0, 1.0
        m = np.zeros(shape[:2], bool)
        m[2:5, 3:7] = True
        items.append(ImageItem(image=img, image_id=iid, patient_id=pid, modality=mod, spacing_mm=spacing,
                               source=f"/secret/site/{iid}.png", meta={"diagnosis": "benign", "k": [1, 2]}))
        masks[iid] = SealedMask(m, source=iid)
    return items, EvalMasks(masks, items)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("hf://datasets/org/name", ("org/name", None, None)),
        ("hf://datasets/org/name/train", ("org/name", None, "train")),
        ("hf://datasets/org/name@v1.0/data/busi", ("org/name", "v1.0", "data/busi")),
        ("hf://datasets/org/name@refs%2Fpr%2F3/sub", ("org/name", "refs/pr/3", "sub")),
        ("hf://datasets/org/name@refs/pr/3/sub", ("org/name", "refs/pr/3", "sub")),
        ("org/my.data-set_1", ("org/my.data-set_1", None, None)),
    ],
)
def test_parse_source_hub_forms(source: str, expected: tuple) -> None:
    s = hub.parse_source(source)
    assert (s.path, s.revision, s.data_dir) == expected and not s.is_local


def test_parse_source_local_and_errors(tmp_path: Path) -> None:
    s = hub.parse_source(str(tmp_path))
    assert s.is_local and s.path == str(tmp_path.resolve())
    for bad in ("hf://models/org/name", "hf://datasets/org", "./no/such/dir", "justaname", ""):
        with pytest.raises(ValueError):
            hub.parse_source(bad)
    with pytest.raises(ValueError, match="conflicts"):
        hub.parse_source("hf://datasets/org/name@v1", revision="v2")
    assert hub.parse_source("hf://datasets/org/name", revision="abc").revision == "abc"


def test_round_trip_local_folder(tmp_path: Path) -> None:
    items, masks = _items()
    out = hub.write_imagefolder(items, masks, tmp_path / "ds")
    assert sorted(p.name for p in out.iterdir()) == ["images", "masks", "metadata.jsonl"]
    assert "/secret/site" not in (out / "metadata.jsonl").read_text()
    back, back_masks = hub.load_items(str(out), cache_dir=tmp_path / "cache")
    assert [b.image_id for b in back] == [it.image_id for it in items]
    for a, b in zip(items, back):
        got = (b.patient_id, b.modality, b.spacing_mm, dict(b.meta))
        assert got == (a.patient_id, a.modality, a.spacing_mm, dict(a.meta))
        assert b.image.shape == a.image.shape and b.image.dtype == np.float32
        tol = 0.5 / 255 if a.image.ndim == 3 else 0.5 / 65535
        np.testing.assert_allclose(b.image, a.image, atol=tol + 1e-7)
        np.testing.assert_array_equal(_peek(back_masks[b.image_id]), _peek(masks[a.image_id]))


def test_write_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    items, masks = _items()
    hu = ImageItem(image=np.full((16, 16), -1000.0, np.float32), image_id="hu", patient_id="P9", modality="CT",
                   source="x.dcm")
    all_masks = EvalMasks({**dict(masks), "hu": SealedMask(np.zeros((16, 16), bool), source="m")})
    with pytest.raises(ValueError, match=r"x\.dcm: image values .* outside \[0, 1\]"):
        hub.write_imagefolder(items + [hu], all_masks, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no mask"):
        hub.write_imagefolder(items, EvalMasks({}), tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="exists"):
        hub.write_imagefolder(items, masks, tmp_path / "exists")


def test_hub_path_uses_the_same_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An hf:// source reaches load_dataset as (repo, data_dir, revision); the rows go through the same converter."""
    import datasets

    items, masks = _items()
    folder = hub.write_imagefolder(items, masks, tmp_path / "repo" / "busi")
    real = datasets.load_dataset
    calls = []

    def fake(path: str, **kwargs):  # stands in for the Hub: serves the folder the repo would hold
        calls.append((path, dict(kwargs)))
        kwargs.pop("revision", None)
        return real(str(tmp_path / "repo"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    via_hub, hub_masks = hub.load_items("hf://datasets/org/name@abc123/busi", cache_dir=tmp_path / "c1")
    expected = {"split": "train", "revision": "abc123", "data_dir": "busi", "cache_dir": str(tmp_path / "c1")}
    assert calls == [("org/name", expected)]
    local, _ = hub.load_items(str(folder), cache_dir=tmp_path / "c2")
    assert calls[-1][0] == str(folder.resolve())
    assert [i.image_id for i in via_hub] == [i.image_id for i in local]
    for a, b in zip(via_hub, local):
        np.testing.assert_array_equal(a.image, b.image)
    assert via_hub[0].source.startswith("hf://datasets/org/name@abc123/busi[train]")


def test_rows_missing_patient_id_or_bad_mask_name_the_row(tmp_path: Path) -> None:
    items, masks = _items()
    out = hub.write_imagefolder(items[:2], EvalMasks({k: masks[k] for k in ("us/1", "us/2")}), tmp_path / "ds")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    rows[1]["patient_id"] = ""
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"\[train\]\[1\]: missing patient id"):
        hub.load_items(str(out), cache_dir=tmp_path / "cache")
    from PIL import Image

    rows[1]["patient_id"] = "P1"
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.fromarray(np.full((20, 24), 255, np.uint8)).save(out / rows[0]["mask_file_name"])
    with pytest.raises(ValueError, match=r"\[train\]\[0\] mask: mask covers the whole image"):
        hub.load_items(str(out), cache_dir=tmp_path / "cache2")
