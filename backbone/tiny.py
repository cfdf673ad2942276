"""The embedded default backbone: a tiny timm ViT with a fixed-seed random initialisation.

It needs no download, runs in seconds on two CPU cores and goes through the same registry, preprocessing
and token-extraction code as the real backbones. Its "revision" is the seed; the weight digest computed at
build time is recorded with every run.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from .registry import BackboneSpec, register, weights_dir

TINY_SEED = 0


def build_tiny_vit(*, spec: BackboneSpec, weights: str | Path | None = None) -> torch.nn.Module:
    """Build the embedded tiny ViT (timm ``VisionTransformer``) from a fixed seed, or load saved weights.

    Args:
        spec: the registry entry (geometry).
        weights: optional ``.safetensors`` file saved from this architecture; loaded with ``strict=True``.
    """
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=spec.image_size,
            patch_size=spec.patch_size,
            embed_dim=spec.width,
            depth=spec.depth,
            num_heads=4,
            num_classes=0,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    path = weights_dir(weights)
    if path is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)), strict=True)
    return model


TINY_VIT = register(
    BackboneSpec(
        name="tiny-vit",
        library="timm",
        hub_id=None,
        revision=None,
        image_size=128,
        patch_size=16,
        depth=6,
        width=64,
        num_prefix_tokens=1,
        num_registers=0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        builder=build_tiny_vit,
        modality="any (embedded default)",
        notes=f"timm VisionTransformer, 6 blocks, width 64, 4 heads, random init with torch seed {TINY_SEED}",
    )
)
