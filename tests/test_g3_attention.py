"""CLS attention read through hooks equals the attention matrix each model computes itself.

References: timm's own non-fused attention path (softmax probabilities captured at ``attn_drop``) for the
embedded tiny ViT and for a RoPE + register DINOv3 (timm Eva); transformers' eager attention with
``output_attentions=True`` for DINOv2 with registers; ``nn.MultiheadAttention``'s own head-averaged weights
for open_clip's ViT. Models are small random instances built offline.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from covtoken.backbone.attention import cls_attention, cls_attention_maps, high_norm_tokens
from covtoken.backbone.frozen import FrozenBackbone, load_backbone
from covtoken.backbone.registry import BackboneSpec


def _spec(name: str, library: str, *, image_size: int, patch_size: int, depth: int, width: int, prefix: int,
          registers: int = 0) -> BackboneSpec:
    return BackboneSpec(name=name, library=library, hub_id=None, revision=None, image_size=image_size,
                        patch_size=patch_size, depth=depth, width=width, num_prefix_tokens=prefix,
                        num_registers=registers, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        builder=lambda **_: None)


def _timm_reference(model: torch.nn.Module, pixels: torch.Tensor, npre: int) -> dict[int, torch.Tensor]:
    """Head-averaged CLS rows of the attention probabilities read with timm's public ``timm.utils.AttentionExtract``.

    AttentionExtract hooks each block's ``attn_drop`` (the softmax output, identity in eval) on timm's non-fused
    path; the kit does not use it itself because it materialises the full (B, H, T, T) matrix of every block
    (MedDINOv3 at 512 px: ~50 MB per image and block), where the kit computes only the CLS row.
    """
    from timm.utils import AttentionExtract

    for blk in model.blocks:
        blk.attn.fused_attn = False
    try:
        with torch.no_grad():
            maps = AttentionExtract(model, names=["blocks.*.attn.attn_drop"], method="hook")(pixels)
    finally:
        for blk in model.blocks:
            blk.attn.fused_attn = True
    return {int(name.split(".")[1]): a[:, :, 0, npre:].mean(1) for name, a in maps.items()}


def test_tiny_vit_matches_timm_attention_probabilities():
    bb = load_backbone("tiny-vit")
    pixels = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    got = cls_attention(bb, pixels, blocks=[0, 3, 5])
    ref = _timm_reference(bb.model, pixels, npre=1)
    for b in (0, 3, 5):
        assert got[b].shape == (3, 64)
        torch.testing.assert_close(got[b], ref[b], atol=1e-6, rtol=1e-5)
    # attention to the CLS token itself is excluded, so rows sum to less than 1 but more than 0
    assert bool((got[3].sum(1) < 1).all()) and bool((got[3].sum(1) > 0).all())
    # the blocks differ (a hook wired to the wrong block would repeat one map)
    assert not torch.allclose(got[0], got[5])


def test_rope_dinov3_with_registers_matches_timm():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=3, embed_dim=64,
                              num_heads=4)
    assert model.num_prefix_tokens == 5  # CLS + 4 registers
    bb = FrozenBackbone(_spec("tiny-dinov3", "timm", image_size=64, patch_size=16, depth=3, width=64, prefix=5,
                              registers=4), model)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = cls_attention(bb, pixels, blocks=[1, 2])
    ref = _timm_reference(bb.model, pixels, npre=5)
    for b in (1, 2):
        assert got[b].shape == (2, 16)
        torch.testing.assert_close(got[b], ref[b], atol=1e-6, rtol=1e-5)


def test_transformers_dinov2_registers_matches_eager_attentions():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 image_size=28, patch_size=14, num_register_tokens=4)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(cfg).eval()
    bb = FrozenBackbone(_spec("tiny-dinov2-reg", "transformers", image_size=28, patch_size=14, depth=2, width=32,
                              prefix=5, registers=4), model)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    got = cls_attention(bb, pixels, blocks=[0, 1])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(pixel_values=pixels, output_attentions=True).attentions
    for b in (0, 1):
        torch.testing.assert_close(got[b], att[b][:, :, 0, 5:].mean(1), atol=1e-6, rtol=1e-5)


def test_open_clip_vit_matches_multihead_attention_weights():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    visual = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4,
                                                     mlp_ratio=2.0, output_dim=16).eval()
    bb = FrozenBackbone(_spec("tiny-clip", "open_clip", image_size=32, patch_size=8, depth=2, width=32, prefix=1),
                        visual)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = cls_attention(bb, pixels, blocks=[1])
    inputs = {}
    mha = visual.transformer.resblocks[1].attn
    h = mha.register_forward_pre_hook(lambda mod, args: inputs.__setitem__("x", args[0]))
    with torch.no_grad():
        visual(pixels)
    h.remove()
    x = inputs["x"]
    with torch.no_grad():
        _, weights = mha(x, x, x, need_weights=True, average_attn_weights=True)
    if not mha.batch_first:
        pytest.fail("open_clip ViT blocks are expected to be batch-first here")
    torch.testing.assert_close(got[1], weights[:, 0, 1:], atol=1e-6, rtol=1e-5)


def test_maps_batching_and_errors():
    bb = load_backbone("tiny-vit")
    rng = np.random.default_rng(0)
    images = [rng.random((128, 128), dtype=np.float32) for _ in range(5)]
    maps = cls_attention_maps(bb, images, [2], batch_size=2)
    one = cls_attention(bb, bb.preprocess(images), [2])[2].numpy()
    np.testing.assert_allclose(maps[2], one, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        cls_attention(bb, bb.preprocess(images[:1]), [6])


def test_high_norm_tokens_flags_planted_artefacts():
    rng = np.random.default_rng(0)
    tok = rng.standard_normal((2, 50, 16))
    tok[0, 7] *= 10.0  # a Darcet-style artefact token
    flags = high_norm_tokens(tok)
    assert flags[0, 7] and flags.sum() == 1
