"""Patch-token extraction, one function per model library.

Each function returns ``{block: (B, N, d)}`` with prefix (CLS/register) tokens already stripped and block
indices 0-based. The dispatcher picks the function from the spec's library.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .frozen import FrozenBackbone

__all__ = ["extract_patch_tokens"]


def _timm_tokens(model: torch.nn.Module, pixels: torch.Tensor, blocks: Sequence[int], *, final_norm: bool,
                 num_prefix: int) -> dict[int, torch.Tensor]:
    # timm ViTs expose forward_intermediates: 0-based block indices, prefix tokens dropped, optional norm.
    feats = model.forward_intermediates(pixels, indices=list(blocks), norm=final_norm, output_fmt="NLC",
                                        intermediates_only=True)
    return dict(zip(blocks, feats))


_EXTRACTORS: dict[str, Callable[..., dict[int, torch.Tensor]]] = {"timm": _timm_tokens}


def register_extractor(library: str, fn: Callable[..., dict[int, torch.Tensor]]) -> None:
    """Add the extraction function of a library (each library once)."""
    if library in _EXTRACTORS:
        raise ValueError(f"an extractor for {library!r} is already registered")
    _EXTRACTORS[library] = fn


def extract_patch_tokens(backbone: "FrozenBackbone", pixels: torch.Tensor, blocks: Sequence[int], *,
                         final_norm: bool) -> dict[int, torch.Tensor]:
    """Dispatch to the extractor of ``backbone.spec.library``."""
    try:
        fn = _EXTRACTORS[backbone.spec.library]
    except KeyError:
        raise ValueError(f"no token extractor for library {backbone.spec.library!r}; have {sorted(_EXTRACTORS)}") from None
    return fn(backbone.model, pixels, blocks, final_norm=final_norm, num_prefix=backbone.spec.num_prefix_tokens)
