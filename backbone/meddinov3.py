"""MedDINOv3 ViT-B/16 (CT-3M) on timm's DINOv3 architecture: checkpoint key mapping and strict loading.

The Hub file ``model.pth`` of ``ricklisz123/MedDINOv3-ViTB-16-CT-3M`` is ``torch.save({"teacher": {...}})``. Keys of
the backbone carry the prefix ``backbone.`` and follow the DINOv3 research code; the other teacher keys
(``dino_head.*``, ``ibot_head.*``) are projection heads and are not part of the backbone.

The official README builds the backbone as ``vit_base(layerscale_init=1e-5, n_storage_tokens=4, qkv_bias=False,
mask_k_bias=True)`` with the default norm (``nn.LayerNorm``, eps 1e-6) and loads the stripped teacher dict with
``strict=True``. timm's ``vit_base_patch16_dinov3`` is that network: 12 blocks of width 768, 12 heads, layer scale,
no q/k/v bias (the ``_qkvb`` variant would add ``q_bias``/``v_bias`` parameters the checkpoint does not have), RoPE
with base 100 and 1 CLS + 4 register tokens, no absolute position embedding. Only the LayerNorm eps is overridden
(timm uses 1e-5) to match the README.

Key mapping (DINOv3 -> timm):
    ``storage_tokens``            -> ``reg_token``
    ``blocks.{i}.ls1.gamma``      -> ``blocks.{i}.gamma_1`` (``ls2`` -> ``gamma_2``)
    ``rope_embed.periods``        -> not a timm parameter: checked against timm's RoPE schedule, then copied into
                                     the ``rope.periods`` buffer so the angles use the stored (bf16) periods
    ``mask_token``                -> dropped (masked-image pretraining only)
    ``*.bias_mask``               -> dropped (constant k-bias mask buffer; only present with a q/k/v bias)
    everything else               -> unchanged (``cls_token``, ``patch_embed.proj.*``, ``blocks.{i}.norm1/attn.qkv/
                                     attn.proj/norm2/mlp.fc1/mlp.fc2.*``, ``norm.*``)
Anything left over or missing fails the load with the offending keys listed.
"""
from __future__ import annotations

import logging
import re
from functools import partial
from typing import Mapping

import torch

__all__ = [
    "TIMM_ARCH", "CHECKPOINT_FILENAME", "BACKBONE_PREFIX", "CheckpointMismatchError", "create_meddinov3_vit",
    "backbone_state_dict", "to_timm_state_dict", "load_meddinov3_checkpoint",
]

log = logging.getLogger(__name__)

TIMM_ARCH = "vit_base_patch16_dinov3"
CHECKPOINT_FILENAME = "model.pth"
BACKBONE_PREFIX = "backbone."
TEACHER_KEY = "teacher"
ROPE_PERIODS_KEY = "rope_embed.periods"
LAYER_NORM_EPS = 1e-6
HEAD_DIM = 64
_LAYER_SCALE = re.compile(r"^blocks\.(\d+)\.ls([12])\.gamma$")
_DROPPED_KEYS = ("mask_token",)
_DROPPED_SUFFIXES = (".bias_mask",)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not match the architecture exactly."""


def create_meddinov3_vit(*, image_size: int, patch_size: int = 16, depth: int = 12,
                         width: int = 768, data_config: Mapping[str, object] | None = None) -> torch.nn.Module:
    """The MedDINOv3 backbone as a randomly initialised timm ``Eva`` (DINOv3 ViT with 4 registers and RoPE).

    Args:
        image_size: nominal square input (RoPE makes the model accept other sizes too).
        patch_size: must be 16, the DINOv3 patch size.
        depth, width: 12 and 768 for ViT-B; smaller values build the same architecture for tests.
        data_config: entries of timm's pretrained config to replace (timm ``pretrained_cfg_overlay``), e.g. the
            MedDINOv3 mean/std, so that ``timm.data.resolve_model_data_config`` returns them.
    """
    import timm
    from timm.layers import LayerNorm

    if patch_size != 16:
        raise ValueError(f"MedDINOv3 uses 16-pixel patches, got patch_size={patch_size}")
    if width % HEAD_DIM:
        raise ValueError(f"width {width} is not a multiple of the head dimension {HEAD_DIM}")
    return timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=image_size, depth=depth,
                             embed_dim=width, num_heads=width // HEAD_DIM,
                             norm_layer=partial(LayerNorm, eps=LAYER_NORM_EPS),
                             pretrained_cfg_overlay=dict(data_config or {}))


def backbone_state_dict(checkpoint: Mapping[str, object], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``teacher`` entries under ``backbone.``, with the prefix stripped (head weights are left out)."""
    if not isinstance(checkpoint, Mapping) or TEACHER_KEY not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointMismatchError(f"{source}: expected a dict with a {TEACHER_KEY!r} entry, got {keys}")
    teacher = checkpoint[TEACHER_KEY]
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in teacher.items() if k.startswith(BACKBONE_PREFIX)}
    if not backbone:
        raise CheckpointMismatchError(f"{source}: no {BACKBONE_PREFIX!r} keys under {TEACHER_KEY!r} "
                                      f"(first keys: {sorted(teacher)[:5]})")
    others = sorted({k.split(".", 1)[0] for k in teacher if not k.startswith(BACKBONE_PREFIX)})
    if others:
        log.info("%s: ignoring teacher heads %s", source, others)
    return backbone


def to_timm_state_dict(backbone: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Rename DINOv3 backbone keys to timm ``Eva`` keys.

    Returns:
        ``(state_dict, rope_periods)``; ``rope_periods`` is None when the checkpoint has no ``rope_embed.periods``.
    """
    mapped: dict[str, torch.Tensor] = {}
    periods = None
    for key, value in backbone.items():
        if key == ROPE_PERIODS_KEY:
            periods = value
            continue
        if key in _DROPPED_KEYS or key.endswith(_DROPPED_SUFFIXES):
            continue
        if key == "storage_tokens":
            new = "reg_token"
        elif m := _LAYER_SCALE.match(key):
            new = f"blocks.{m.group(1)}.gamma_{m.group(2)}"
        else:
            new = key
        if new in mapped:
            raise CheckpointMismatchError(f"two checkpoint keys map to {new!r}")
        mapped[new] = value
    return mapped, periods


def load_meddinov3_checkpoint(model: torch.nn.Module, checkpoint: Mapping[str, object], *,
                              source: str = "checkpoint") -> None:
    """Load a MedDINOv3 checkpoint into a model from :func:`create_meddinov3_vit`, strictly.

    Raises:
        CheckpointMismatchError: listing missing keys, unexpected keys and shape mismatches, or when the stored
            RoPE periods do not follow timm's schedule for this architecture.
    """
    mapped, periods = to_timm_state_dict(backbone_state_dict(checkpoint, source=source))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if periods is None:
        missing.append(ROPE_PERIODS_KEY + " (checkpoint key)")
    unexpected = sorted(set(mapped) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in sorted(mapped.items()) if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{source} does not match {TIMM_ARCH} (depth {len(model.blocks)}, width {model.embed_dim}): "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {shapes}")
    model.load_state_dict(mapped, strict=True)

    rope_periods = model.rope.periods
    stored = periods.detach().to(dtype=rope_periods.dtype, device=rope_periods.device)
    if stored.shape != rope_periods.shape or not torch.allclose(stored, rope_periods, rtol=1e-2, atol=0.0):
        raise CheckpointMismatchError(
            f"{source}: {ROPE_PERIODS_KEY} {stored.flatten()[:4].tolist()}... does not follow timm's RoPE schedule "
            f"{rope_periods.flatten()[:4].tolist()}... (shape {tuple(stored.shape)} vs {tuple(rope_periods.shape)})")
    if getattr(model.rope, "pos_embed_cached", None) is not None:
        raise CheckpointMismatchError("the RoPE embedding is cached at build time; build with dynamic_img_size=True")
    rope_periods.copy_(stored)
