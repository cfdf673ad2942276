"""CLS attention of a frozen ViT, recomputed from each block's own projections (EViT-style saliency).

EViT (Liang et al., ICLR 2022) ranks patch tokens by the attention the CLS query pays them, averaged over
heads. Fused attention kernels never materialise that matrix, so it is recomputed here: a forward pre-hook
on the block's attention module captures its input (and, for timm's RoPE ViTs such as DINOv3/MedDINOv3, the
rotary embedding passed with it), and the module's own projections give ``q`` and ``k`` exactly as its
forward does (q/k norms, q/k/v biases, RoPE on the patch tokens only). Only the CLS row is computed:

    a_h = softmax(q_h[CLS] k_h^T * scale)   (scale = head_dim^-1/2, the module's own),
    saliency[j] = mean_h a_h[prefix + j]    for every patch token j.

The CLS token is the first token in every supported model; register tokens (DINOv2-reg, DINOv3, MedDINOv3)
follow it and are excluded from the ranking, as the CLS token is. Values are not renormalised over patch
tokens (EViT does not either), so a row sums to 1 minus the attention paid to prefix tokens.

High-norm pitfall (Darcet et al., "Vision Transformers Need Registers", ICLR 2024): in ViTs trained without
registers a few background tokens carry ~10x the typical norm and soak up CLS attention, so a saliency
baseline can sit near chance for reasons unrelated to lesions. Use the registers-aware model where one
exists (``dinov2-base-reg`` rather than ``dinov2-base``) and report :func:`high_norm_tokens` next to it.

Public APIs and why they are not used here (tests/test_g3_attention.py shows the results are identical): timm's
``timm.utils.AttentionExtract`` and transformers' ``output_attentions=True`` both need the non-fused/eager attention
path and materialise the full ``(B, H, T, T)`` matrix of every block (MedDINOv3 at 512 px: ~50 MB per image and
block); this module computes only the CLS row with the fused kernels left on. The test compares against
AttentionExtract (timm), eager ``output_attentions`` (transformers) and ``need_weights`` (open_clip's MHA).

Supported: timm ViTs (``Attention``, ``EvaAttention`` with RoPE), timm trunks of open_clip towers,
transformers DINOv2 (+registers) attention (``q_proj``/``k_proj``), open_clip's own ViT
(``nn.MultiheadAttention``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .frozen import FrozenBackbone

__all__ = ["cls_attention", "cls_attention_maps", "high_norm_tokens", "attention_modules"]

QK = Callable[[torch.nn.Module, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, float]]


class _Stop(Exception):
    """Raised by the hook of the last requested block; later blocks are not needed."""


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.reshape(b, t, n_heads, -1).transpose(1, 2)  # (B, H, T, hd)


def _timm_qk(attn: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """q, k of a timm ``Attention`` / ``EvaAttention`` as its forward computes them, ``(B, H, T, hd)`` each."""
    b, t, _ = x.shape
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if getattr(attn, "qkv_bias_separate", False) else F.linear(x, attn.qkv.weight, bias)
        q, k, _ = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k = _heads(attn.q_proj(x), attn.num_heads), _heads(attn.k_proj(x), attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = kwargs.get("rope")
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        # the CLS query is a prefix token: RoPE never touches it
    return q, k, float(attn.scale)


def _hf_qk(attn: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """q, k of a transformers DINOv2 attention module (``q_proj``/``k_proj``, ``scaling``)."""
    h = attn.config.num_attention_heads
    return _heads(attn.q_proj(x), h), _heads(attn.k_proj(x), h), float(attn.scaling)


def _mha_qk(attn: torch.nn.MultiheadAttention, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """q, k of ``nn.MultiheadAttention`` with a packed input projection (open_clip's own ViT)."""
    if not attn._qkv_same_embed_dim:
        raise ValueError("nn.MultiheadAttention with separate k/v dimensions is not a self-attention ViT block")
    if not attn.batch_first:
        x = x.transpose(0, 1)
    d = attn.embed_dim
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(x, w[:d], None if bias is None else bias[:d])
    k = F.linear(x, w[d:2 * d], None if bias is None else bias[d:2 * d])
    return _heads(q, attn.num_heads), _heads(k, attn.num_heads), float(attn.head_dim ** -0.5)


def attention_modules(backbone: "FrozenBackbone", blocks: Sequence[int]
                      ) -> tuple[list[torch.nn.Module], QK, Callable[[torch.Tensor], object]]:
    """The attention module of each requested block, its q/k function, and how to run the model.

    Raises:
        ValueError: a model family this module cannot read.
    """
    model, lib = backbone.model, backbone.spec.library
    trunk = getattr(model, "trunk", None) if lib == "open_clip" else None
    if lib == "timm" or trunk is not None:
        m = trunk if trunk is not None else model
        return [m.blocks[b].attn for b in blocks], _timm_qk, m.forward_features
    if lib == "transformers":
        return [model.encoder.layer[b].attention for b in blocks], _hf_qk, lambda p: model(pixel_values=p)
    if lib == "open_clip":
        mods = [model.transformer.resblocks[b].attn for b in blocks]
        if not all(isinstance(m, torch.nn.MultiheadAttention) for m in mods):
            raise ValueError(f"{backbone.spec.name}: open_clip blocks use {type(mods[0]).__name__}, "
                             "only nn.MultiheadAttention is supported")
        return mods, _mha_qk, model
    raise ValueError(f"{backbone.spec.name}: no CLS-attention reader for library {lib!r}; "
                     "have timm, transformers, open_clip")


@torch.inference_mode()
def cls_attention(backbone: "FrozenBackbone", pixels: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Head-averaged CLS-to-patch attention of the requested blocks.

    Args:
        backbone: frozen backbone (its spec gives the prefix-token count and grid).
        pixels: ``(B, 3, S, S)`` output of ``backbone.preprocess``.
        blocks: 0-based block indices.

    Returns:
        ``{block: (B, N) float32 CPU tensor}`` over the ``N = gh * gw`` patch tokens, row-major.
    """
    blocks = sorted(set(int(b) for b in blocks))
    bad = [b for b in blocks if not 0 <= b < backbone.spec.depth]
    if not blocks or bad:
        raise ValueError(f"{backbone.spec.name}: block indices {bad or blocks} outside [0, {backbone.spec.depth})")
    npre = backbone.spec.num_prefix_tokens
    if npre < 1:
        raise ValueError(f"{backbone.spec.name}: no CLS token (num_prefix_tokens = {npre}); CLS attention is undefined")
    n_patch = backbone.grid[0] * backbone.grid[1]
    mods, qk, run = attention_modules(backbone, blocks)
    out: dict[int, torch.Tensor] = {}

    def hook_for(b: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states", kwargs.get("query")))
            q, k, scale = qk(module, x, kwargs)
            if k.shape[2] != npre + n_patch:
                raise RuntimeError(f"{backbone.spec.name}: block {b} attends over {k.shape[2]} tokens, expected "
                                   f"{npre} prefix + {n_patch} patch tokens")
            a = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, T)
            out[b] = a[:, :, 0, npre:].mean(1).cpu()
            if b == blocks[-1]:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(hook_for(b), with_kwargs=True) for b, m in zip(blocks, mods)]
    try:
        run(pixels)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [b for b in blocks if b not in out]
    if missing:
        raise RuntimeError(f"{backbone.spec.name}: attention of blocks {missing} was never computed")
    return out


def cls_attention_maps(backbone: "FrozenBackbone", images: Sequence[np.ndarray], blocks: Sequence[int], *,
                       batch_size: int = 32) -> dict[int, np.ndarray]:
    """:func:`cls_attention` over a list of images in the common layout, batched.

    Returns:
        ``{block: (len(images), N) float32}``.
    """
    parts: dict[int, list[np.ndarray]] = {int(b): [] for b in blocks}
    for s in range(0, len(images), batch_size):
        att = cls_attention(backbone, backbone.preprocess(images[s:s + batch_size]), blocks)
        for b, a in att.items():
            parts[b].append(a.numpy())
    return {b: np.concatenate(p) for b, p in parts.items()}


def high_norm_tokens(tokens: np.ndarray, *, factor: float = 4.0) -> np.ndarray:
    """Flag artefact-like tokens whose norm exceeds ``factor`` times the median patch-token norm of their image.

    Args:
        tokens: ``(B, N, d)`` patch tokens.
        factor: multiple of the image's median norm (Darcet et al. report ~10x for artefact tokens).

    Returns:
        ``(B, N)`` bool.
    """
    t = np.asarray(tokens)
    if t.ndim != 3:
        raise ValueError(f"tokens must be (B, N, d), got shape {t.shape}")
    norms = np.linalg.norm(t, axis=-1)
    return norms > factor * np.median(norms, axis=1, keepdims=True)
