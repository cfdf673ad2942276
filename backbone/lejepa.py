"""Encoders pretrained by the LeJEPA job, as frozen backbones.

:func:`encoder_backbone` wraps any encoder state of the job's timm architecture (a checkpoint, or the random
initialisation it started from) in a :class:`FrozenBackbone`, so that probes read embeddings and patch tokens
through the same preprocessing and extraction code as every registered backbone.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .frozen import FrozenBackbone, attach_source
from .registry import BackboneSpec

__all__ = ["encoder_spec", "encoder_backbone"]


def encoder_spec(encoder: Mapping[str, Any], *, name: str, mean: Sequence[float], std: Sequence[float],
                 notes: str = "") -> BackboneSpec:
    """An (unregistered) spec for the timm ViT described by the job's ``encoder`` parameters."""
    from ..arch.lejepa import build_encoder

    def builder(*, spec: BackboneSpec, weights: Any = None) -> torch.nn.Module:
        return build_encoder(encoder, init_seed=0)

    return BackboneSpec(name=name, library="timm", hub_id=None, revision=None, image_size=int(encoder["img_size"]),
                        patch_size=int(encoder["patch_size"]), depth=int(encoder["depth"]),
                        width=int(encoder["embed_dim"]), num_prefix_tokens=1, num_registers=0,
                        mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std), builder=builder,
                        modality="any", notes=notes or f"timm {encoder['timm_model']} trained by LeJEPA (covtoken G8)")


def encoder_backbone(encoder: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None, *, name: str,
                     init_seed: int, mean: Sequence[float], std: Sequence[float], origin: str,
                     device: str = "cpu") -> FrozenBackbone:
    """A frozen backbone of the job's architecture with ``state`` loaded strictly (``None``: the random init).

    Args:
        encoder: timm model name and kwargs (the locked ``pretraining.encoder``).
        state: encoder weights (timm keys), e.g. from ``covtoken.arch.pretrain.encoder_state_from_checkpoint``.
        name: the name recorded in provenance (``lejepa-step000150``, ``lejepa-random-init``...).
        init_seed: the initialisation seed (used when ``state`` is None).
        origin: where the weights come from, recorded as the source origin.
    """
    from ..arch.lejepa import build_encoder

    model = build_encoder(encoder, init_seed=init_seed)
    if state is not None:
        model.load_state_dict(dict(state), strict=True)
    attach_source(model, origin=origin, resolved_revision=None)
    return FrozenBackbone(encoder_spec(encoder, name=name, mean=mean, std=std), model, device=device)
