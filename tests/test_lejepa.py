"""LeJEPA: the encoder starts from the registered tiny ViT's initialisation, views are label-free and seeded, the loss
has no stop-gradient, and pretraining resumes after a kill to the same weights as an unbroken run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from covtoken.arch.lejepa import LeJEPAConfig, build_encoder, lejepa_loss, make_views
from covtoken.arch.pretrain import CheckpointError, encoder_state_from_checkpoint, pretrain, rankme
from covtoken.backbone.frozen import load_backbone, state_dict_digest

TINY = {"timm_model": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2,
        "num_heads": 2}


def tiny_cfg(**kw) -> LeJEPAConfig:
    base = dict(encoder=TINY, global_size=32, local_size=16, global_views=2, local_views=2, batch_size=4, steps=6,
                checkpoint_every=2, warmup_steps=2, num_slices=16, proj_hidden=16, proj_dim=8, monitor_images=8)
    return LeJEPAConfig(**{**base, **kw})


def images(n: int = 10, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    return [rng.random((40, 40), dtype=np.float32) for _ in range(n)], [f"img{i:02d}" for i in range(n)]


def run(tmp, name: str, **kw):
    imgs, ids = images()
    return pretrain(imgs, ids, tiny_cfg(), out_dir=tmp / name, seed=3, mean=(0.5,) * 3, std=(0.5,) * 3, **kw)


def test_embedded_encoder_starts_from_the_registered_tiny_vit():
    enc = build_encoder({"timm_model": "vit_tiny_patch16_224", "img_size": 128, "patch_size": 16, "embed_dim": 64,
                         "depth": 6, "num_heads": 4}, init_seed=0)
    assert state_dict_digest(enc) == load_backbone("tiny-vit").weights_digest
    assert state_dict_digest(build_encoder(TINY, init_seed=1)) != state_dict_digest(build_encoder(TINY, init_seed=0))


def test_views_are_seeded_shaped_and_leave_the_global_rng_alone():
    cfg = tiny_cfg()
    batch = torch.rand(4, 3, 32, 32)
    state = torch.random.get_rng_state()
    g1, l1 = make_views(batch, cfg, (0.5,) * 3, (0.5,) * 3, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    g2, l2 = make_views(batch, cfg, (0.5,) * 3, (0.5,) * 3, seed=7)
    g3, _ = make_views(batch, cfg, (0.5,) * 3, (0.5,) * 3, seed=8)
    assert g1.shape == (2, 4, 3, 32, 32) and l1.shape == (2, 4, 3, 16, 16)
    assert torch.equal(g1, g2) and torch.equal(l1, l2) and not torch.equal(g1, g3)
    assert not torch.equal(g1[0], g1[1])  # two different global views of each image


def test_loss_has_no_stop_gradient_and_vanishes_for_identical_gaussian_views():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 512, 8, generator=g).expand(3, -1, -1).clone().requires_grad_(True)
    parts = lejepa_loss(z, lam=0.05, num_slices=32, generator=g)
    assert float(parts["pred"].detach()) < 1e-10 and float(parts["sigreg"].detach()) < 5
    z2 = torch.randn(3, 64, 8, generator=g, requires_grad=True)
    lejepa_loss(z2, lam=0.5, num_slices=8, generator=g)["pred"].backward()
    assert all(float(z2.grad[v].abs().sum()) > 0 for v in range(3))  # every view, the "target" mean included


def test_collapse_raises_sigreg_and_rankme_sees_it():
    g = torch.Generator().manual_seed(1)
    collapsed = torch.randn(1, 256, 16, generator=g).expand(2, -1, -1) * 0 + torch.randn(16, generator=g)
    healthy = torch.randn(2, 256, 16, generator=g)
    lc = lejepa_loss(collapsed, lam=0.05, num_slices=32, generator=torch.Generator().manual_seed(2))
    lh = lejepa_loss(healthy, lam=0.05, num_slices=32, generator=torch.Generator().manual_seed(2))
    assert float(lc["pred"]) < 1e-10 and float(lc["sigreg"]) > 50 * float(lh["sigreg"])
    x = torch.randn(500, 16, generator=g)
    assert rankme(x) > 14 and rankme(x[:, :1] @ torch.ones(1, 16)) < 1.5


def test_resume_after_a_kill_gives_the_same_weights_as_an_unbroken_run(tmp_path):
    whole = run(tmp_path, "whole")
    killed = run(tmp_path, "broken", stop_after=3)  # "killed" after step 3; last checkpoint at step 2
    assert [c["step"] for c in killed.checkpoints] == [2]
    resumed = run(tmp_path, "broken")
    assert resumed.resumed_from == 2
    assert [c["sha256"] for c in resumed.checkpoints] == [c["sha256"] for c in whole.checkpoints]
    a = encoder_state_from_checkpoint(tmp_path / "whole" / whole.checkpoints[-1]["path"])
    b = encoder_state_from_checkpoint(tmp_path / "broken" / resumed.checkpoints[-1]["path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.allclose(whole.losses, resumed.losses, atol=1e-6, rtol=0)  # earlier steps restored from the manifest
    # and the weights did change from the initialisation
    init = build_encoder(TINY, init_seed=0).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_monitor_and_manifest_are_recorded(tmp_path):
    res = run(tmp_path, "m")
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [c["step"] for c in doc["shards"]] == [2, 4, 6]
    mon = res.checkpoints[-1]["monitor"]
    assert {"sigreg_projected", "rankme_embedding", "per_dim_std"} <= mon.keys()
    assert np.isfinite(res.losses).all() and res.image_ids == sorted(res.image_ids)


def test_a_tampered_checkpoint_is_refused_not_silently_restarted(tmp_path):
    res = run(tmp_path, "t", stop_after=2)
    path = tmp_path / "t" / res.checkpoints[-1]["path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        run(tmp_path, "t")


def test_a_folder_of_another_run_is_refused(tmp_path):
    run(tmp_path, "o", stop_after=2)
    imgs, ids = images(seed=1)
    with pytest.raises(CheckpointError, match="another run"):
        pretrain(imgs, ids, tiny_cfg(), out_dir=tmp_path / "o", seed=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_input_order_does_not_matter(tmp_path):
    imgs, ids = images()
    a = pretrain(imgs, ids, tiny_cfg(steps=2), out_dir=tmp_path / "a", seed=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    b = pretrain(imgs[::-1], ids[::-1], tiny_cfg(steps=2), out_dir=tmp_path / "b", seed=3, mean=(0.5,) * 3,
                 std=(0.5,) * 3)
    assert a.checkpoints[-1]["sha256"] == b.checkpoints[-1]["sha256"]


def test_bad_protocol_parameters_fail_clearly():
    with pytest.raises(ValueError, match="unknown pretraining parameter"):
        LeJEPAConfig.from_params({"lam": 0.05, "lamda": 0.1})
    with pytest.raises(ValueError, match="lam"):
        LeJEPAConfig(lam=1.5)
