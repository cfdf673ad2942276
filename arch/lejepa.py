"""LeJEPA as published: multi-view invariance plus SIGReg, no EMA teacher, no stop-gradient.

Every image of a batch gets ``global_views`` large crops and ``local_views`` small crops from a label-free
augmentation pipeline (random resized crops through ``torchvision.ops.roi_align``, flip, brightness/contrast
jitter, ``transforms.v2`` blur and normalisation), batched per view so that a step costs one call per view.
One encoder (a timm ViT built with ``dynamic_img_size=True``, so local crops keep their own resolution) and a
small projector map every view to ``z``; the loss is

    L = lam * SIGReg(z) + (1 - lam) * mean_v mean_n ||z_{v,n} - zbar_n||^2 / K,

where ``zbar_n`` is the mean of image ``n``'s views (every view predicts it; gradients flow through both sides)
and SIGReg (:mod:`covtoken.arch.sigreg`) is averaged over views, each view's batch tested with the same fresh
directions. The encoder's pooled output (CLS after the final norm) is what downstream probes read; the
projector is discarded after pretraining.

Nothing here reads a mask or a label: the views are functions of the pixels, the step number and the seed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms import v2

from .sigreg import DEFAULT_KNOTS, DEFAULT_T_MAX, sigreg

__all__ = ["LeJEPAConfig", "LeJEPAModel", "build_encoder", "make_views", "lejepa_loss",
           "images_to_tensor", "check_known_params"]


def check_known_params(cls: type, params: Mapping[str, Any], *, what: str) -> None:
    """Raise ``ValueError`` naming any key of ``params`` that is not a field of the config dataclass ``cls``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown}; valid: {sorted(fields)}")


@dataclass(frozen=True)
class LeJEPAConfig:
    """The protocol parameters of one pretraining run (recorded in the record; all but ``steps`` are locked).

    Attributes:
        lam: weight of SIGReg (``1 - lam`` weighs the view-prediction term); LeJEPA uses 0.02-0.05.
        num_slices: ``M``, random directions per step.
        t_max, knots: Epps-Pulley quadrature.
        global_views, local_views: crops per image; global crops at ``global_size``, local at ``local_size``.
        global_scale, local_scale: area ranges of the random resized crops.
        proj_hidden, proj_dim: projector MLP widths.
        steps, batch_size: optimisation length and images per step (drawn with a per-step seed).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up and cosine decay.
        checkpoint_every: steps between checkpoints (the last step is always one).
        encoder: timm model name and keyword arguments of the 2-D encoder.
        init_seed: torch seed of the encoder's initialisation (the random-init baseline is the same).
        monitor_images: training images embedded at every checkpoint for the collapse monitor.
    """

    lam: float = 0.05
    num_slices: int = 256
    t_max: float = DEFAULT_T_MAX
    knots: int = DEFAULT_KNOTS
    global_views: int = 2
    local_views: int = 4
    global_size: int = 128
    local_size: int = 64
    global_scale: tuple = (0.35, 1.0)
    local_scale: tuple = (0.08, 0.35)
    proj_hidden: int = 256
    proj_dim: int = 64
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    checkpoint_every: int = 100
    encoder: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {
        "timm_model": "vit_tiny_patch16_224", "img_size": 128, "patch_size": 16, "embed_dim": 64, "depth": 6,
        "num_heads": 4})
    init_seed: int = 0
    monitor_images: int = 128

    def __post_init__(self) -> None:
        if not 0.0 < self.lam < 1.0:
            raise ValueError(f"lam must lie in (0, 1), got {self.lam}")
        if self.global_views < 2 and self.global_views + self.local_views < 2:
            raise ValueError("LeJEPA needs at least two views per image")
        for name in ("num_slices", "steps", "batch_size", "checkpoint_every", "proj_dim", "proj_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (SIGReg tests a batch)")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> "LeJEPAConfig":
        """Build from the locked ``pretraining`` parameters; an unknown key raises, naming it."""
        merged = {**dict(params), **overrides}
        check_known_params(cls, merged, what="pretraining")
        for k in ("global_scale", "local_scale"):
            if k in merged:
                merged[k] = tuple(float(x) for x in merged[k])
        return cls(**merged)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder"] = dict(self.encoder)
        d["global_scale"], d["local_scale"] = list(self.global_scale), list(self.local_scale)
        return d


def build_encoder(encoder: Mapping[str, Any], *, init_seed: int) -> nn.Module:
    """The 2-D encoder: ``timm.create_model`` with the given kwargs, ``num_classes=0``, dynamic image size.

    The initialisation is drawn under ``torch.manual_seed(init_seed)`` without touching the caller's RNG; with
    the embedded kwargs and seed 0 it is bit-identical to the registered ``tiny-vit`` (tested).
    """
    kw = dict(encoder)
    name = kw.pop("timm_model")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(init_seed))
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
    finally:
        torch.random.set_rng_state(state)


class LeJEPAModel(nn.Module):
    """Encoder + projector. ``forward`` maps ``(B, 3, H, W)`` to the projected ``(B, proj_dim)``."""

    def __init__(self, encoder: nn.Module, *, proj_hidden: int, proj_dim: int, init_seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        width = int(encoder.num_features)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(int(init_seed) + 1)
            self.projector = nn.Sequential(nn.Linear(width, proj_hidden), nn.BatchNorm1d(proj_hidden), nn.GELU(),
                                           nn.Linear(proj_hidden, proj_dim))
        finally:
            torch.random.set_rng_state(state)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled embedding ``(B, width)`` (what probes read)."""
        return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.embed(x))


def images_to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Grey ``(H, W)`` or RGB ``(H, W, 3)`` images in [0, 1] -> ``(n, 3, size, size)`` float32 (bilinear, no crop)."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32)
    for i, img in enumerate(images):
        t = torch.as_tensor(np.asarray(img, dtype=np.float32))
        t = t[None].expand(3, -1, -1) if t.ndim == 2 else t.permute(2, 0, 1)
        out[i] = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out


def _crops(batch: torch.Tensor, n_views: int, size: int, scale: tuple, gen: torch.Generator) -> torch.Tensor:
    """``n_views`` random resized crops of every image (areas in ``scale``, aspect in [3/4, 4/3]), one batched
    ``torchvision.ops.roi_align`` per view: ``(n_views, B, 3, size, size)``."""
    b, _, h, w = batch.shape
    out = []
    for _ in range(n_views):
        u = torch.rand(b, 4, generator=gen)
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
        cw = torch.sqrt(area * ratio).clamp(max=w)
        ch = torch.sqrt(area / ratio).clamp(max=h)
        x0, y0 = (w - cw) * u[:, 2], (h - ch) * u[:, 3]
        boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1)
        out.append(roi_align(batch, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2,
                             aligned=True))
    return torch.stack(out)


def _photometric(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image horizontal flip (p = 0.5) and brightness/contrast jitter (factors in [0.6, 1.4], p = 0.8), then one
    Gaussian blur per view batch (``transforms.v2.functional.gaussian_blur``, p = 0.3). ``x``: ``(B, 3, S, S)``."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen)
    x = torch.where((u[:, 0] < 0.5).view(b, 1, 1, 1), x.flip(-1), x)
    on = (u[:, 1] < 0.8).float().view(b, 1, 1, 1)
    bright = 1 + on * (0.8 * u[:, 2].view(b, 1, 1, 1) - 0.4)
    contrast = 1 + on * (0.8 * u[:, 3].view(b, 1, 1, 1) - 0.4)
    x = (x * bright).clamp(0, 1)
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - grey) * contrast + grey).clamp(0, 1)
    v = torch.rand(2, generator=gen)
    if v[0] < 0.3:
        x = v2.functional.gaussian_blur(x, kernel_size=[5, 5], sigma=[0.1 + 1.4 * float(v[1])])
    return x


def make_views(batch: torch.Tensor, cfg: LeJEPAConfig, mean: Sequence[float], std: Sequence[float], *,
               seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label-free views of a batch, drawn from ``seed`` alone (no global RNG is read or advanced).

    Random resized crops (global: ``global_scale`` at ``global_size``; local: ``local_scale`` at ``local_size``),
    flips, brightness/contrast jitter and blur, then the encoder's normalisation (``transforms.v2.Normalize``).

    Args:
        batch: ``(B, 3, S, S)`` images in [0, 1].

    Returns:
        ``(global, local)``: ``(Vg, B, 3, Sg, Sg)`` and ``(Vl, B, 3, Sl, Sl)`` (None without local views).
    """
    gen = torch.Generator().manual_seed(int(seed))
    norm = v2.Normalize(list(mean), list(std))

    def views(n: int, size: int, scale: tuple) -> torch.Tensor:
        crops = _crops(batch, n, size, scale, gen)
        return torch.stack([norm(_photometric(c, gen)) for c in crops])

    g = views(cfg.global_views, cfg.global_size, cfg.global_scale)
    loc = views(cfg.local_views, cfg.local_size, cfg.local_scale) if cfg.local_views else None
    return g, loc


def lejepa_loss(z: torch.Tensor, *, lam: float, num_slices: int, generator: torch.Generator,
                t_max: float = DEFAULT_T_MAX, knots: int = DEFAULT_KNOTS) -> dict[str, torch.Tensor]:
    """LeJEPA's loss of projected views ``z`` (``(V, B, K)``).

    Returns:
        ``{"loss", "sigreg", "pred"}``: the total, SIGReg averaged over views (same directions for each view), and
        the view-prediction term ``mean (z - zbar)^2`` (mean over views, images and dimensions).
    """
    if z.ndim != 3 or z.shape[0] < 2:
        raise ValueError(f"z must be (V >= 2, B, K), got {tuple(z.shape)}")
    z = z.float()
    pred = (z - z.mean(0, keepdim=True)).square().mean()
    state = generator.get_state()
    per_view = []
    for v in range(z.shape[0]):
        generator.set_state(state)  # the same directions for every view of this step
        per_view.append(sigreg(z[v], num_slices=num_slices, generator=generator, t_max=t_max, knots=knots))
    reg = torch.stack(per_view).mean()
    return {"loss": lam * reg + (1 - lam) * pred, "sigreg": reg, "pred": pred}
