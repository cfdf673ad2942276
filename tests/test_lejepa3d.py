"""3-D LeJEPA: MONAI's ViT with spatial_dims=3 trains on volumetric crops of stacked slices (smoke), deterministically."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from covtoken.arch.lejepa3d import (LeJEPA3DConfig, build_encoder_3d, pretrain_3d, stack_volumes, training_volumes,
                                    volume_views)
from covtoken.arch.pretrain import CheckpointError
from covtoken.data.catalog import load_dataset


def phantom_volumes():
    data = load_dataset("phantom-ct", seed=2, n_patients=6, per_patient=4, size=64)
    pos = {}
    positions = []
    for it in data.items:  # slice order within a patient = generation order
        positions.append(pos.setdefault(it.patient_id, 0))
        pos[it.patient_id] += 1
    return stack_volumes([it.image for it in data.items], [it.patient_id for it in data.items], positions)


def test_slices_stack_into_ordered_volumes_and_bad_input_fails():
    vols, ids = phantom_volumes()
    assert len(vols) == 6 and vols[0].shape == (4, 64, 64) and ids == sorted(ids)
    a, b = np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32)
    v, _ = stack_volumes([b, a], ["x", "x"], [2.0, 1.0])
    assert v[0][0].max() == 0 and v[0][1].min() == 1  # ordered by position, not by input order
    with pytest.raises(ValueError, match="different shapes"):
        stack_volumes([a, np.zeros((4, 4), np.float32)], ["x", "x"], [0, 1])


def test_encoder_is_monai_vit_in_three_dimensions():
    enc = build_encoder_3d(LeJEPA3DConfig())
    assert type(enc).__module__.startswith("monai.") and any(isinstance(m, torch.nn.Conv3d) for m in enc.modules())
    tokens, _ = enc(torch.zeros(2, 1, 4, 32, 32))
    assert tokens.shape == (2, 2 * 4 * 4, 64)


def test_views_are_seeded_crops():
    vols = [torch.rand(4, 64, 64) for _ in range(3)]
    cfg = LeJEPA3DConfig()
    a, b, c = (volume_views(vols, cfg, seed=s) for s in (1, 1, 2))
    assert a.shape == (4, 3, 1, 4, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.slow
def test_pretrain_3d_smoke_is_finite_deterministic_and_moves_the_weights():
    vols, _ = phantom_volumes()
    cfg = LeJEPA3DConfig(steps=4, batch_size=4, views=3)
    r1 = pretrain_3d(vols, cfg, seed=0)
    r2 = pretrain_3d(vols[::-1], cfg, seed=0, volume_ids=[str(i) for i in range(len(vols))][::-1])
    l1, l2 = r1.losses, r2.losses  # the input order cannot matter: volumes are indexed by id
    assert np.isfinite(l1).all() and np.array_equal(l1, l2)
    s1, s2, s0 = r1.model.encoder.state_dict(), r2.model.encoder.state_dict(), build_encoder_3d(cfg).state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s0[k]) for k in s1)


def test_training_volumes_take_training_patients_only_in_slice_order():
    data = load_dataset("phantom-ct", seed=2, n_patients=6, per_patient=3, size=32)
    pids = sorted({it.patient_id for it in data.items})
    vols, ids = training_volumes(list(reversed(data.items)), pids[:2])
    assert ids == pids[:2] and [v.shape for v in vols] == [(3, 32, 32)] * 2
    first = next(it for it in data.items if it.patient_id == pids[0] and it.image_id.endswith("s00"))
    assert np.array_equal(vols[0][0], first.image)
    with pytest.raises(ValueError, match="no training patient"):
        training_volumes(data.items, ["nobody"])


def _state(res):
    return {k: v.clone() for k, v in res.model.state_dict().items()}


def test_3d_pretraining_resumed_after_a_kill_equals_an_unbroken_run(tmp_path):
    vols, ids = phantom_volumes()
    cfg = LeJEPA3DConfig(steps=6, batch_size=3, views=2, checkpoint_every=2, monitor_volumes=4)
    whole = pretrain_3d(vols, cfg, seed=0, volume_ids=ids, out_dir=tmp_path / "a")
    killed = pretrain_3d(vols, cfg, seed=0, volume_ids=ids, out_dir=tmp_path / "b", stop_after=3)
    assert [c["step"] for c in killed.checkpoints] == [2]  # step 3 ran but was never saved: it is redone
    resumed = pretrain_3d(vols, cfg, seed=0, volume_ids=ids, out_dir=tmp_path / "b")
    assert resumed.resumed_from == 2 and [c["step"] for c in resumed.checkpoints] == [2, 4, 6]
    a, b = _state(whole), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c["sha256"] for c in whole.checkpoints] == [c["sha256"] for c in resumed.checkpoints]
    # steps after the resume are recomputed bit for bit; earlier ones come from the manifest (6 decimals)
    assert np.array_equal(whole.losses[2:], resumed.losses[2:]) and np.isfinite(whole.losses).all()
    assert np.allclose(whole.losses[:2], resumed.losses[:2], rtol=0, atol=1e-6)
    mon = whole.checkpoints[-1]["monitor"]
    assert mon["embedding_dim"] == 64 and mon["n_images"] == 4 and np.isfinite(mon["sigreg_projected"])
    # a different seed is another run: its folder is refused, never silently reused
    with pytest.raises(CheckpointError, match="another run"):
        pretrain_3d(vols, cfg, seed=1, volume_ids=ids, out_dir=tmp_path / "b")
    # a checkpoint whose bytes changed is refused, never resumed from or silently restarted
    path = tmp_path / "b" / resumed.checkpoints[-1]["path"]
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        pretrain_3d(vols, cfg, seed=0, volume_ids=ids, out_dir=tmp_path / "b")


def test_pretraining_on_the_kits_volume_loader_sees_training_cases_in_slice_order(tmp_path):
    """The kit's NIfTI volume loader (KiTS23 layout, phantom cases) -> training cases' volumes -> checkpoints."""
    import nibabel as nib

    from covtoken.arch.lejepa3d import pretrain_volumes
    from covtoken.data.splits import split_patients

    rng = np.random.default_rng(0)
    for c in range(4):
        case = tmp_path / "kits" / f"case_{c:05d}"
        case.mkdir(parents=True)
        img = rng.normal(40, 20, (24, 20, 9)).astype(np.float32)
        img[..., :] += np.arange(9, dtype=np.float32) * 30  # brighter with depth: slice order is visible
        seg = np.zeros(img.shape, np.uint8)
        seg[8:11, 8:11, 2:7] = 2
        aff = np.diag([0.8, 0.8, 3.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), case / "imaging.nii.gz")
        nib.save(nib.Nifti1Image(seg, aff), case / "segmentation.nii.gz")
    data = load_dataset("kits23", root=tmp_path / "kits")
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                            seed=0)
    vols, ids = training_volumes(data.items[::-1], splits["train"])
    depth = sum(it.patient_id == ids[0] for it in data.items)
    assert ids == sorted(splits["train"]) and depth >= 3 and vols[0].shape[0] == depth
    assert all(np.all(np.diff(v.mean(axis=(1, 2))) >= 0) for v in vols)  # stacked by slice_index, not input order
    cfg = LeJEPA3DConfig(steps=2, batch_size=2, views=2, checkpoint_every=1, monitor_volumes=2)
    res = pretrain_volumes(data, splits, cfg, seed=0, out_dir=tmp_path / "ckpt")
    assert res.volume_ids == sorted(splits["train"]) and [c["step"] for c in res.checkpoints] == [1, 2]
    assert all((tmp_path / "ckpt" / c["path"]).is_file() for c in res.checkpoints)
