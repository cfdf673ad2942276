"""Pooled image embeddings of a frozen backbone (one vector per image), as each library defines them.

Patch tokens (:mod:`covtoken.backbone.extract`) are what the localisation gates read; the probe heads of
G7 read the model's own image embedding instead:

* timm: ``forward_head(forward_features(x), pre_logits=True)`` - the pooled feature the classifier would
  see (CLS token after the final norm for ``global_pool="token"``), whatever head the model carries;
* open_clip: the image tower's ``forward`` - the projected embedding ``CLIP.encode_image(x)`` returns
  (unnormalised); for a timm trunk (BiomedCLIP) that is the trunk plus open_clip's projection head;
* transformers (DINOv2): ``pooler_output`` - the CLS token after the final layernorm.

:func:`preprocess_batch` is :meth:`FrozenBackbone.preprocess` (each library's own transform).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .frozen import FrozenBackbone
    from .registry import BackboneSpec

__all__ = ["preprocess_batch", "image_embedding", "embed_images", "embedding_model_id"]


def embedding_model_id(spec: "BackboneSpec") -> str:
    """The id a probe checkpoint stores as ``input_embedding_model_id``: the Hub id, or the registry name."""
    return spec.hub_id.removeprefix("hf-hub:") if spec.hub_id else spec.name


def preprocess_batch(backbone: "FrozenBackbone", images: Sequence[np.ndarray]) -> torch.Tensor:
    """Images in the common layout -> ``(B, 3, S, S)`` float32: ``backbone.preprocess`` (the library's transform).

    Args:
        backbone: the frozen backbone.
        images: ``(H, W)`` grey or ``(H, W, 3)`` RGB float arrays in [0, 1]; shapes may differ.

    Returns:
        ``(B, 3, S, S)`` tensor on the backbone's device, in the order of ``images``.
    """
    return backbone.preprocess(images)


def _timm_embed(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(pixels), pre_logits=True)


def _open_clip_embed(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixels)
    return out[0] if isinstance(out, tuple) else out  # towers with output_tokens=True return (pooled, tokens)


def _transformers_embed(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixels).pooler_output


_EMBEDDERS: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "timm": _timm_embed,
    "open_clip": _open_clip_embed,
    "transformers": _transformers_embed,
}


@torch.inference_mode()
def image_embedding(backbone: "FrozenBackbone", pixels: torch.Tensor) -> torch.Tensor:
    """The pooled image embedding of each image.

    Args:
        backbone: the frozen backbone.
        pixels: ``(B, 3, S, S)`` from :func:`preprocess_batch` or ``backbone.preprocess``.

    Returns:
        ``(B, D)`` float32 on CPU (not normalised).

    Raises:
        ValueError: a library without an embedder; FloatingPointError: NaN/Inf embeddings.
    """
    lib = backbone.spec.library
    try:
        fn = _EMBEDDERS[lib]
    except KeyError:
        raise ValueError(f"no image-embedding rule for library {lib!r}; have {sorted(_EMBEDDERS)}") from None
    z = fn(backbone.model, pixels)
    if z.ndim != 2 or z.shape[0] != pixels.shape[0]:
        raise RuntimeError(f"{backbone.spec.name}: embedding has shape {tuple(z.shape)}, expected (B, D)")
    if not torch.isfinite(z).all():
        raise FloatingPointError(f"{backbone.spec.name}: NaN/Inf in image embeddings")
    return z.float().cpu()


def embed_images(backbone: "FrozenBackbone", images: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
    """Embed images in batches.

    Args:
        backbone: the frozen backbone.
        images: arrays in the common layout.
        batch_size: images per forward pass.

    Returns:
        ``(n, D)`` float32 array (not normalised).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not len(images):
        raise ValueError("embed_images got no images")
    chunks = [image_embedding(backbone, preprocess_batch(backbone, images[i:i + batch_size])).numpy()
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks).astype(np.float32, copy=False)
