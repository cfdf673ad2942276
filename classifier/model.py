"""The lesion classifier: a trainable image backbone, a metadata branch and a head.

``logits = head([backbone(pixels), meta_branch(encoded questionnaire)])``; with an empty feature schema there is no
metadata branch and the head sees the image feature alone. Preprocessing uses the backbone's own ``data_config``
(size, mean, std from the library's processor configuration): images in the common layout ((H, W, 3) floats in
[0, 1], or grey) are resized to the square input (no crop, so a lesion at the border is never cut) and normalised.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FeatureBackbone

__all__ = ["LesionClassifier", "preprocess_images", "tta_views"]


class LesionClassifier(nn.Module):
    """Backbone + metadata branch + head.

    Args:
        backbone: the trainable feature extractor.
        n_classes: output classes.
        meta_dim: width of the encoded questionnaire (0: no metadata branch).
        meta_hidden: width of the metadata branch's output.
        head_hidden: hidden width of the head (0: a linear head).
        dropout: dropout before the head.
    """

    def __init__(self, backbone: FeatureBackbone, *, n_classes: int, meta_dim: int, meta_hidden: int = 32,
                 head_hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.backbone = backbone
        self.meta_dim = int(meta_dim)
        self.meta = nn.Sequential(nn.Linear(meta_dim, meta_hidden), nn.GELU(),
                                  nn.Linear(meta_hidden, meta_hidden), nn.GELU()) if meta_dim else None
        width = backbone.num_features + (meta_hidden if meta_dim else 0)
        layers: list[nn.Module] = [nn.LayerNorm(width), nn.Dropout(dropout)]
        if head_hidden:
            layers += [nn.Linear(width, head_hidden), nn.GELU(), nn.Linear(head_hidden, n_classes)]
        else:
            layers.append(nn.Linear(width, n_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels`` (B, 3, S, S) preprocessed, ``meta`` (B, meta_dim) encoded -> logits (B, n_classes)."""
        f = self.backbone(pixels)
        if self.meta is not None:
            if meta is None or meta.shape[1] != self.meta_dim:
                raise ValueError(f"metadata of width {self.meta_dim} required, got "
                                 f"{None if meta is None else tuple(meta.shape)}")
            f = torch.cat([f, self.meta(meta.to(f.dtype))], dim=1)
        return self.head(f)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.head.parameters(), *(self.meta.parameters() if self.meta is not None else [])]

    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's layer groups (prefixed ``backbone.``); head and metadata branch fall in the last group,
        so timm's layer-wise decay gives them the full learning rate."""
        inner = self.backbone.group_matcher(coarse=coarse)
        out = {}
        for k, v in inner.items():
            out[k] = _prefix(v) if isinstance(v, str) else [(_prefix(rx), rest) for rx, rest in v]
        return out


def _prefix(rx: str) -> str:
    return "^backbone\\.(?:" + rx.removeprefix("^") + ")"


def preprocess_images(images: Sequence[np.ndarray], data_config: dict) -> torch.Tensor:
    """Images in the common layout -> ``(B, 3, S, S)`` float32 normalised with the backbone's mean/std.

    Bilinear resize with antialiasing to the square ``input_size`` (no crop), then ``(x - mean) / std``.
    """
    side = int(data_config["input_size"][-1])
    batch = []
    for img in images:
        t = torch.as_tensor(np.asarray(img, dtype=np.float32))
        if t.ndim == 2:
            t = t[None].expand(3, -1, -1)
        elif t.ndim == 3 and t.shape[2] == 3:
            t = t.permute(2, 0, 1)
        else:
            raise ValueError(f"image must be (H, W) or (H, W, 3), got {tuple(t.shape)}")
        batch.append(F.interpolate(t[None], size=(side, side), mode="bilinear", align_corners=False,
                                   antialias=True)[0])
    x = torch.stack(batch)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def tta_views(pixels: torch.Tensor, views: Sequence[str]) -> list[torch.Tensor]:
    """Test-time views of a preprocessed batch: ``"identity"``, ``"hflip"``, ``"vflip"``, ``"crop90"`` (central
    90% crop resized back)."""
    out = []
    side = pixels.shape[-1]
    for v in views:
        if v == "identity":
            out.append(pixels)
        elif v == "hflip":
            out.append(torch.flip(pixels, dims=[3]))
        elif v == "vflip":
            out.append(torch.flip(pixels, dims=[2]))
        elif v == "crop90":
            m = max(1, round(side * 0.05))
            out.append(F.interpolate(pixels[:, :, m:side - m, m:side - m], size=(side, side), mode="bilinear",
                                     align_corners=False))
        else:
            raise ValueError(f"unknown TTA view {v!r}; choose from identity, hflip, vflip, crop90")
    return out
