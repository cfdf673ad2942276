"""Multiply-accumulate counts of a ViT forward, analytic and counted from the operations actually run.

Analytic (science notes §5; "GFLOPs" in timm/fvcore are GMACs): a pre-LN block with N tokens, width d and MLP
ratio 4 costs ``12 N d^2 + 2 N^2 d`` MACs (qkv + output projection 4Nd^2, QK^T and AV 2N^2 d, MLP 8Nd^2); the
patch embedding adds ``N_p 3 p^2 d``; LayerNorm, softmax, GELU, RoPE and residual adds are O(Nd) and ignored.
For a real module the per-token linear cost is read from the block's ``nn.Linear`` layers, so a different MLP
(SwiGLU, another ratio) is counted as built.

Counted: :class:`MacCounter` is a ``TorchDispatchMode`` that adds up the MACs of every matmul-class aten op
(linear, mm, addmm, bmm, baddbmm, matmul, scaled dot-product attention, convolution) that a forward runs and
refuses to stay silent about one it does not know, so the analytic count can be checked against the
implementation, not only against itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..gate.keep import keep_count  # the one keep-count rule (G3, G5, G6), re-exported here

__all__ = ["block_macs", "vit_macs", "routed_speedup", "ViTGeometry", "MacCounter", "keep_count"]


def block_macs(n_tokens: int | float, width: int, *, linear_per_token: int | None = None) -> float:
    """MACs of one transformer block on ``n_tokens`` tokens.

    Args:
        n_tokens: N (CLS and registers included).
        width: d.
        linear_per_token: MACs of the block's linear layers per token (default ``12 d^2``, MLP ratio 4).

    Returns:
        ``linear_per_token * N + 2 N^2 d``.
    """
    lin = 12 * width * width if linear_per_token is None else linear_per_token
    return lin * n_tokens + 2 * n_tokens * n_tokens * width


def vit_macs(*, image_size: int, patch_size: int, width: int, depth: int, num_prefix: int = 1,
             in_chans: int = 3) -> float:
    """MACs of a whole ViT forward (patch embedding + every block; no head).

    Example: ViT-B/16 @224 (``width=768, depth=12``) -> 17.56e9 (timm lists 17.58 GMACs).
    """
    n_p = (image_size // patch_size) ** 2
    return n_p * in_chans * patch_size ** 2 * width + depth * block_macs(n_p + num_prefix, width)


def routed_speedup(*, depth: int, all_blocks: int, keep: float, n_tokens: int, width: int) -> float:
    """Closed-form FLOPs ratio of routed depth (blocks only, no router), as written in the notes.

    ``L MACs(N) / [l0 MACs(N) + (L - l0) MACs(f N + 1)]`` with ``l0 = all_blocks`` blocks run on every token.
    Example: ViT-B/16 @512 (N = 1025, d = 768, L = 12), ``l0 = 4, f = 0.44`` -> 1.67.
    """
    if not 0 <= all_blocks <= depth or not 0.0 <= keep <= 1.0:
        raise ValueError(f"need 0 <= all_blocks <= depth and 0 <= keep <= 1, got {all_blocks}, {depth}, {keep}")
    full = depth * block_macs(n_tokens, width)
    return full / (all_blocks * block_macs(n_tokens, width) + (depth - all_blocks) * block_macs(keep * n_tokens + 1, width))


@dataclass(frozen=True)
class ViTGeometry:
    """What the MAC count of a ViT forward depends on, read from the module itself."""

    depth: int
    width: int
    n_patches: int
    num_prefix: int
    patch_macs: int
    linear_per_token: tuple[int, ...]

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, n_patches: int, num_prefix: int) -> "ViTGeometry":
        """Read depth, width, patch-embedding cost and each block's per-token linear MACs from ``model``."""
        conv = model.patch_embed.proj
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"patch embedding {type(conv).__name__} is not a Conv2d; cannot count its MACs")
        kh, kw = conv.kernel_size
        patch = n_patches * conv.in_channels // conv.groups * kh * kw * conv.out_channels
        per_block = tuple(sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, torch.nn.Linear))
                          for blk in model.blocks)
        return cls(len(model.blocks), int(model.embed_dim), int(n_patches), int(num_prefix), int(patch), per_block)

    def full_macs(self, batch: int = 1) -> int:
        """MACs of the unrouted forward of ``batch`` images."""
        n = self.n_patches + self.num_prefix
        return batch * (self.patch_macs + sum(int(block_macs(n, self.width, linear_per_token=lin))
                                              for lin in self.linear_per_token))

    def routed_macs(self, *, exit_after: int, n_keep: int, router_macs_per_token: int, batch: int = 1) -> int:
        """MACs when every token runs blocks ``0..exit_after`` and ``n_keep`` patch tokens (+ prefix) the rest.

        Args:
            exit_after: 0-based block after which unrouted tokens exit.
            n_keep: patch tokens routed through the remaining blocks.
            router_macs_per_token: the scorer's MACs per patch token (run once, after ``exit_after``).
            batch: images.
        """
        if not 0 <= exit_after < self.depth:
            raise ValueError(f"exit_after={exit_after} outside [0, {self.depth})")
        if not 1 <= n_keep <= self.n_patches:
            raise ValueError(f"n_keep={n_keep} outside [1, {self.n_patches}]")
        n, k = self.n_patches + self.num_prefix, n_keep + self.num_prefix
        blocks = sum(int(block_macs(n if b <= exit_after else k, self.width, linear_per_token=lin))
                     for b, lin in enumerate(self.linear_per_token))
        return batch * (self.patch_macs + blocks + self.n_patches * router_macs_per_token)


def _numel(shape: Any) -> int:
    return int(math.prod(int(s) for s in shape))


class MacCounter(TorchDispatchMode):
    """Count the MACs of matmul-class aten ops run inside the ``with`` block.

    ``counter.macs`` is the total, ``counter.by_op`` the split per op name. An op whose name looks like a
    matmul, convolution or attention but has no rule here raises ``NotImplementedError`` (a silent zero would
    make the check pass for the wrong reason).
    """

    _HEAVY = ("mm", "mv", "matmul", "conv", "attention", "einsum", "linear", "tensordot", "dot")

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.by_op: dict[str, int] = {}

    def _add(self, name: str, macs: int) -> None:
        self.macs += int(macs)
        self.by_op[name] = self.by_op.get(name, 0) + int(macs)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "linear":
            x, w = args[0], args[1]
            self._add(name, _numel(x.shape[:-1]) * w.shape[0] * w.shape[1])
        elif name in ("mm", "addmm"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self._add(name, a.shape[0] * a.shape[1] * b.shape[1])
        elif name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            self._add(name, a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])
        elif name == "matmul":
            a, b = args[0], args[1]
            if a.dim() < 2 or b.dim() < 2:
                raise NotImplementedError(f"MacCounter: matmul of a vector {tuple(a.shape)} @ {tuple(b.shape)}")
            self._add(name, _numel(out.shape[:-2]) * a.shape[-2] * a.shape[-1] * b.shape[-1])
        elif "scaled_dot_product" in name:
            q, k, v = args[0], args[1], args[2]
            self._add(name, _numel(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
        elif name in ("conv2d", "convolution", "_convolution"):
            w = args[1]
            res = out[0] if isinstance(out, tuple) else out
            self._add(name, res.numel() * _numel(w.shape[1:]))
        elif any(h in name for h in self._HEAVY):
            raise NotImplementedError(f"MacCounter has no MAC rule for aten op {name!r}")
        return out
