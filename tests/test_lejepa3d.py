"""3-D LeJEPA: MONAI's ViT with spatial_dims=3 trains on volumetric crops of stacked slices (smoke), deterministically."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from covtoken.arch.lejepa3d import LeJEPA3DConfig, build_encoder_3d, pretrain_3d, stack_volumes, volume_views
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
    m1, l1 = pretrain_3d(vols, cfg, seed=0)
    m2, l2 = pretrain_3d(vols, cfg, seed=0)
    assert np.isfinite(l1).all() and np.array_equal(l1, l2)
    s1, s2, s0 = m1.encoder.state_dict(), m2.encoder.state_dict(), build_encoder_3d(cfg).state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s0[k]) for k in s1)
