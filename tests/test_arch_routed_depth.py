"""Routed depth and its MAC count: the notes' closed forms, a counted reference, and a masked-attention reference.

* The analytic count reproduces the table and the routed speed-ups of science notes §5.
* :class:`MacCounter` (the ops actually run) equals the analytic count of the full and the routed forward, for the
  tiny ViT and a small DINOv3-style Eva (RoPE, registers).
* Routed outputs equal a slow reference: the same blocks run on the full sequence with attention restricted to the
  routed tokens; exited tokens equal block-k outputs; keep fraction 1 is the full forward.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from covtoken.arch.flops import MacCounter, ViTGeometry, block_macs, keep_count, routed_speedup, vit_macs
from covtoken.arch.routed_depth import (GaussianRouter, PCARouter, RoutedDepth, lesion_routing, make_router,
                                        time_forwards, top_keep)
from covtoken.backbone.frozen import load_backbone
from covtoken.backbone.meddinov3 import create_meddinov3_vit
from covtoken.subspace import GaussianDensity, KNNDensity, PCAResidual

VIT_B = dict(width=768, depth=12)


@pytest.mark.parametrize("kw, gmacs", [
    (dict(image_size=224, patch_size=16), 17.56),
    (dict(image_size=224, patch_size=16, num_prefix=5), 17.93),
    (dict(image_size=224, patch_size=14), 23.16),
    (dict(image_size=512, patch_size=16), 107.0),
    (dict(image_size=518, patch_size=14), 151.6),
])
def test_vit_macs_reproduce_the_notes_table(kw, gmacs):
    assert vit_macs(**kw, **VIT_B) / 1e9 == pytest.approx(gmacs, abs=0.051)


def test_attention_share_and_routed_speedups_of_the_notes():
    n, d = 1025, 768
    attn = 2 * n * n * d / block_macs(n, d)
    assert attn == pytest.approx(n / (6 * d + n)) and round(attn, 3) == 0.182
    for l0, f, want in ((4, 0.44, 1.67), (3, 0.5, 1.69), (6, 0.25, 1.64), (4, 0.2, 2.23)):
        assert routed_speedup(depth=12, all_blocks=l0, keep=f, n_tokens=n, width=d) == pytest.approx(want, abs=0.005)
    # "uniform pruning from the start would need ~62% kept" holds where cost is near-linear (224 px); at 512 px
    # the quadratic term makes 62% worth 1.73x
    assert routed_speedup(depth=12, all_blocks=0, keep=0.62, n_tokens=197, width=d) == pytest.approx(1.6, abs=0.05)
    assert routed_speedup(depth=12, all_blocks=0, keep=0.62, n_tokens=n, width=d) == pytest.approx(1.73, abs=0.01)


def test_geometry_matches_the_closed_form_for_a_standard_vit():
    model = load_backbone("tiny-vit").model
    g = ViTGeometry.from_model(model, n_patches=64, num_prefix=1)
    assert g.linear_per_token == (12 * 64 * 64,) * 6
    assert g.full_macs() == vit_macs(image_size=128, patch_size=16, width=64, depth=6)
    # routed, blocks only and without a router: the notes' formula with N_keep = fN + 1 and f N integral
    routed = g.routed_macs(exit_after=1, n_keep=16, router_macs_per_token=0) - g.patch_macs
    assert (g.full_macs() - g.patch_macs) / routed == pytest.approx(
        routed_speedup(depth=6, all_blocks=2, keep=16 / 65, n_tokens=65, width=64), rel=1e-3)
    assert keep_count(64, 0.3) == 20 and keep_count(64, 0.25) == 16 and keep_count(64, 1e-6) == 1
    with pytest.raises(ValueError, match="keep fraction"):
        keep_count(64, 0.0)


def _fitted(width: int, seed: int = 0) -> GaussianDensity:
    return GaussianDensity().fit(np.random.default_rng(seed).standard_normal((400, width)))


@pytest.fixture(scope="module")
def models():
    tiny = load_backbone("tiny-vit").model
    torch.manual_seed(0)
    eva = create_meddinov3_vit(image_size=64, depth=3, width=128).eval()
    for p in eva.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    return {"tiny": (tiny, torch.randn(3, 3, 128, 128, generator=g)),
            "eva": (eva, torch.randn(3, 3, 64, 64, generator=g))}


@pytest.mark.parametrize("name", ["tiny", "eva"])
@pytest.mark.parametrize("exit_after, keep", [(0, 0.25), (1, 0.3), (1, 1.0)])
def test_counted_macs_equal_the_analytic_count(models, name, exit_after, keep):
    model, x = models[name]
    rd = RoutedDepth(model, exit_after=exit_after, keep=keep, router=GaussianRouter(_fitted(model.embed_dim)))
    with MacCounter() as full:
        rd.full(x)
    with MacCounter() as routed:
        rd.routed(x)
    assert full.macs == rd.full_macs(x.shape[0])
    assert routed.macs == rd.routed_macs(x.shape[0])
    assert routed.by_op["matmul"] == x.shape[0] * rd.n_patches * model.embed_dim ** 2  # the router is counted
    if keep < 1.0:
        assert routed.macs < full.macs


def test_mac_counter_rules_and_refusal():
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    with torch.no_grad(), MacCounter() as c:
        a @ b
        torch.bmm(torch.randn(2, 4, 5), torch.randn(2, 5, 3))
        torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(7, 3, 4, 4), stride=4)
    assert c.macs == 4 * 5 * 6 + 2 * 4 * 5 * 3 + (7 * 2 * 2) * (3 * 4 * 4)
    with pytest.raises(NotImplementedError, match="mv"), MacCounter():
        torch.mv(a, torch.randn(5))


def _masked_reference(rd: RoutedDepth, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Blocks after k on the full sequence, attention restricted to prefix + routed tokens (no gather)."""
    with torch.inference_mode():
        h, rope = rd._embed(x)
        for b in range(rd.exit_after + 1):
            h = rd._block(b, h, rope)
        p, n = rd.num_prefix, h.shape[1]
        allowed = torch.zeros(x.shape[0], n, dtype=torch.bool)
        allowed[:, :p] = True
        allowed.scatter_(1, kept + p, True)
        mask = (allowed[:, :, None] & allowed[:, None, :]) | torch.eye(n, dtype=torch.bool)
        for b in range(rd.exit_after + 1, len(rd.model.blocks)):
            blk = rd.model.blocks[b]
            h = blk(h, rope=rope, attn_mask=mask[:, None]) if rd.is_eva else blk(h, attn_mask=mask[:, None])
        return h


@pytest.mark.parametrize("name", ["tiny", "eva"])
def test_routed_forward_matches_the_masked_reference(models, name):
    model, x = models[name]
    dens = _fitted(model.embed_dim, seed=2)
    rd = RoutedDepth(model, exit_after=0, keep=0.3, router=GaussianRouter(dens))
    out = rd.routed(x)
    ref = _masked_reference(rd, x, out.kept)
    p = rd.num_prefix
    idx = out.kept + p
    routed_rows = torch.cat([torch.arange(p).expand(x.shape[0], -1), idx], dim=1)
    got = torch.gather(out.tokens, 1, routed_rows[..., None].expand(-1, -1, model.embed_dim))
    want = torch.gather(ref, 1, routed_rows[..., None].expand(-1, -1, model.embed_dim))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # exited tokens keep their block-k representation
    with torch.inference_mode():
        h, rope = rd._embed(x)
        block0 = rd._block(0, h, rope)
    exited = torch.ones(x.shape[0], rd.n_patches, dtype=torch.bool)
    exited.scatter_(1, out.kept, False)
    torch.testing.assert_close(out.tokens[:, p:][exited], block0[:, p:][exited], atol=0, rtol=0)
    # the kept set is the top-K of the router, as the numpy rule computes it
    np.testing.assert_array_equal(out.kept.numpy(), top_keep(out.scores.numpy(), rd.n_keep))
    # keep everything = the full forward
    full = RoutedDepth(model, exit_after=0, keep=1.0, router=GaussianRouter(dens))
    torch.testing.assert_close(full.routed(x).tokens, full.full(x), atol=1e-5, rtol=1e-5)


def test_full_forward_is_the_models_forward(models):
    model, x = models["tiny"]
    rd = RoutedDepth(model, exit_after=1, keep=0.5, router=GaussianRouter(_fitted(64)))
    with torch.inference_mode():
        torch.testing.assert_close(model.norm(rd.full(x)), model.forward_features(x), atol=0, rtol=0)
    t = time_forwards(rd, x, repeats=1)
    assert t["full_s"] > 0 and t["routed_s"] > 0 and t["batch"] == 3


def test_routers_match_their_numpy_scorers():
    rng = np.random.default_rng(3)
    fit, q = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)), rng.standard_normal((2, 7, 16))
    for scorer, cls in ((GaussianDensity().fit(fit), GaussianRouter), (PCAResidual(0.8).fit(fit), PCARouter)):
        router = make_router(scorer)
        assert isinstance(router, cls)
        got = router(torch.as_tensor(q, dtype=torch.float32)).numpy()
        np.testing.assert_allclose(got, scorer.score(q.reshape(-1, 16)).reshape(2, 7), rtol=2e-4, atol=1e-3)
    with pytest.raises(TypeError, match="KNNDensity"):
        make_router(KNNDensity(k=1).fit(fit))
    with pytest.raises(ValueError, match="fitted"):
        GaussianRouter(GaussianDensity())


def test_invalid_configurations_fail(models):
    model, _ = models["tiny"]
    router = GaussianRouter(_fitted(64))
    with pytest.raises(ValueError, match="exit_after=5"):
        RoutedDepth(model, exit_after=5, keep=0.5, router=router)
    with pytest.raises(TypeError, match="Sequential"):
        RoutedDepth(torch.nn.Sequential(), exit_after=0, keep=0.5, router=router)
    with pytest.raises(ValueError, match="n_keep"):
        top_keep(np.zeros((2, 4)), 5)


def test_lesion_routing_against_combinatorics():
    n, k = 16, 4
    kept = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    lesions = [[np.array([3, 9]), np.array([10])], [np.array([8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 7])]]
    hit, p, image = lesion_routing(kept, lesions, n)
    assert hit.tolist() == [True, False, True] and image.tolist() == [0, 0, 1]
    for t, got in zip((2, 1, 13), p):
        assert got == pytest.approx(1 - math.comb(n - t, k) / math.comb(n, k))
    assert p[2] == 1.0  # 13 touched tokens cannot all be missed by 4 of 16
    rng = np.random.default_rng(0)
    draws = np.array([np.isin([3, 9], rng.choice(n, k, replace=False)).any() for _ in range(20000)])
    assert draws.mean() == pytest.approx(p[0], abs=0.015)
    with pytest.raises(ValueError, match="outside"):
        lesion_routing(kept, [[np.array([16])], []], n)
