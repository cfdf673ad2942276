"""covtoken.data.hub against the local Hub emulator: an hf://datasets/ path with a pinned revision loads."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from covtoken.data import hub as data_hub
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask

hub_emulator = pytest.importorskip("hub_emulator", reason="tests/hub_emulator.py (the local Hub emulator) is absent")
hub = hub_emulator.hub  # session fixture serving $HF_ENDPOINT


def _items(n: int, seed: int) -> tuple[list[ImageItem], EvalMasks]:
    rng = np.random.default_rng(seed)
    items, masks = [], {}
    for i in range(n):
        img = rng.uniform(0, 1, (16, 20)).astype(np.float32)
        m = np.zeros((16, 20), bool)
        m[4:8, 5:9] = True
        items.append(ImageItem(image=img, image_id=f"img{i}", patient_id=f"P{i % 2}", modality="US"))
        masks[f"img{i}"] = SealedMask(m, source=f"img{i}")
    return items, EvalMasks(masks, items)


def test_hf_path_with_revision_loads_from_the_hub(hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    repo = f"{hub.namespace}/covtoken-data-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo, repo_type="dataset")
    v1_items, v1_masks = _items(4, seed=1)
    data_hub.write_imagefolder(v1_items, v1_masks, tmp_path / "v1" / "busi")
    sha1 = api.upload_folder(folder_path=str(tmp_path / "v1"), repo_id=repo, repo_type="dataset").oid
    api.delete_folder("busi", repo_id=repo, repo_type="dataset")
    v2_items, v2_masks = _items(2, seed=2)
    data_hub.write_imagefolder(v2_items, v2_masks, tmp_path / "v2" / "busi")
    api.upload_folder(folder_path=str(tmp_path / "v2"), repo_id=repo, repo_type="dataset")

    old, _ = data_hub.load_items(f"hf://datasets/{repo}@{sha1}/busi", cache_dir=tmp_path / "c1")
    new, _ = data_hub.load_items(f"hf://datasets/{repo}/busi", cache_dir=tmp_path / "c2")
    assert [it.image_id for it in old] == [it.image_id for it in v1_items]
    assert [it.image_id for it in new] == [it.image_id for it in v2_items]
    for a, b in zip(old, v1_items):
        np.testing.assert_allclose(a.image, b.image, atol=0.5 / 65535 + 1e-7)
