"""Patch-token extraction, one function per model library.

Each function returns ``{block: (B, N, d)}`` with prefix (CLS/register) tokens already stripped and block
indices 0-based; tokens are block outputs, passed through the model's final norm only when ``final_norm``.
The dispatcher picks the function from the spec's library.

* timm: ``forward_intermediates`` (prefix tokens counted by the model itself, checked against the spec).
* transformers: ``output_hidden_states=True``; ``hidden_states[b + 1]`` is the output of block ``b``
  (``hidden_states[0]`` is the embedding output); the final norm is the model's ``layernorm``.
* open_clip: a timm trunk (``visual.trunk``) goes through the timm path; open_clip's own ViT through its public
  ``forward_intermediates`` (``normalize_intermediates`` applies ``ln_post``; prefix tokens are dropped by
  open_clip itself).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .frozen import FrozenBackbone

__all__ = ["extract_patch_tokens", "register_extractor"]


def _timm_tokens(model: torch.nn.Module, pixels: torch.Tensor, blocks: Sequence[int], *, final_norm: bool,
                 num_prefix: int) -> dict[int, torch.Tensor]:
    # timm ViTs expose forward_intermediates: 0-based block indices, prefix tokens dropped, optional norm.
    own_prefix = getattr(model, "num_prefix_tokens", num_prefix)
    if own_prefix != num_prefix:
        raise ValueError(f"{type(model).__name__} has {own_prefix} prefix tokens, the registry says {num_prefix}")
    feats = model.forward_intermediates(pixels, indices=list(blocks), norm=final_norm, output_fmt="NLC",
                                        intermediates_only=True)
    return dict(zip(blocks, feats))


def _transformers_tokens(model: torch.nn.Module, pixels: torch.Tensor, blocks: Sequence[int], *, final_norm: bool,
                         num_prefix: int) -> dict[int, torch.Tensor]:
    hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    depth = model.config.num_hidden_layers
    if hidden is None or len(hidden) != depth + 1:
        raise RuntimeError(f"{type(model).__name__} returned {None if hidden is None else len(hidden)} hidden states, "
                           f"expected {depth + 1} (embeddings + one per block)")
    out = {}
    for b in blocks:
        x = hidden[b + 1]
        if final_norm:
            x = model.layernorm(x)
        out[b] = x[:, num_prefix:]
    return out


def _open_clip_tokens(model: torch.nn.Module, pixels: torch.Tensor, blocks: Sequence[int], *, final_norm: bool,
                      num_prefix: int) -> dict[int, torch.Tensor]:
    trunk = getattr(model, "trunk", None)
    if trunk is not None:  # open_clip TimmModel adapter (e.g. BiomedCLIP)
        return _timm_tokens(trunk, pixels, blocks, final_norm=final_norm, num_prefix=num_prefix)
    if num_prefix != 1:
        raise ValueError(f"open_clip ViTs have exactly one class token, the registry says {num_prefix} prefix tokens")
    out = model.forward_intermediates(pixels, indices=list(blocks), normalize_intermediates=final_norm,
                                      intermediates_only=True, output_fmt="NLC")["image_intermediates"]
    return dict(zip(blocks, out))


_EXTRACTORS: dict[str, Callable[..., dict[int, torch.Tensor]]] = {
    "timm": _timm_tokens,
    "transformers": _transformers_tokens,
    "open_clip": _open_clip_tokens,
}


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
