"""LeJEPA on volumes: MONAI's ViT (``spatial_dims=3``) on random volumetric crops, with the 2-D job's loss.

Slices in the common layout are stacked into volumes with :func:`covtoken.arch.volumetric.group_volumes` (volume =
series or patient id, slices ordered by position). Each step draws ``batch_size`` volumes and, per volume,
``views`` random 3-D crops (a random box of ``crop_scale`` of each axis' extent, resized trilinearly to the
encoder's input), flips and an intensity jitter - all from ``(seed, step)``. The encoder is
``monai.networks.nets.ViT`` (no hand-written transformer); a volume's embedding is the mean of its patch tokens.
The loss is :func:`covtoken.arch.lejepa.lejepa_loss` (SIGReg + view prediction, no teacher, no stop-gradient).

Scope: this module trains and returns the encoder; checkpointing/resume and the gate job are 2-D only for now.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .lejepa import lejepa_loss
from .volumetric import group_volumes

__all__ = ["LeJEPA3DConfig", "stack_volumes", "build_encoder_3d", "LeJEPA3DModel", "volume_views", "pretrain_3d"]


@dataclass(frozen=True)
class LeJEPA3DConfig:
    """Protocol parameters of 3-D pretraining (see :class:`covtoken.arch.lejepa.LeJEPAConfig` for the shared ones).

    Attributes:
        input_size: ``(D, H, W)`` encoder input; every crop is resized to it.
        patch_size: ViT patch ``(pd, ph, pw)``; must divide ``input_size``.
        crop_scale: per-axis fraction range of the random crop.
        vit: keyword arguments of ``monai.networks.nets.ViT`` besides sizes and channels.
    """

    lam: float = 0.05
    num_slices: int = 64
    views: int = 4
    batch_size: int = 4
    steps: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.05
    input_size: tuple = (4, 32, 32)
    patch_size: tuple = (2, 8, 8)
    crop_scale: tuple = (0.5, 1.0)
    proj_dim: int = 32
    init_seed: int = 0
    vit: Mapping[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "mlp_dim": 128, "num_layers": 2,
                                                            "num_heads": 4})


def stack_volumes(images: Sequence[np.ndarray], volume_ids: Sequence[str],
                  positions: Sequence[float]) -> tuple[list[np.ndarray], list[str]]:
    """Stack 2-D slices into ``(D, H, W)`` float32 volumes (RGB averaged to grey), ordered by volume id.

    Raises:
        ValueError: slices of one volume differ in shape (from ``group_volumes``: duplicate positions).
    """
    vols, ids = [], []
    for v in group_volumes(volume_ids, positions):
        sl = [np.asarray(images[r], dtype=np.float32) for r in v.rows]
        sl = [s.mean(-1) if s.ndim == 3 else s for s in sl]
        if len({s.shape for s in sl}) != 1:
            raise ValueError(f"volume {v.volume_id!r}: slices of different shapes {sorted({s.shape for s in sl})}")
        vols.append(np.stack(sl))
        ids.append(v.volume_id)
    return vols, ids


def build_encoder_3d(cfg: LeJEPA3DConfig) -> nn.Module:
    """MONAI's 3-D ViT (``spatial_dims=3``, one channel, no classification head) from ``cfg.init_seed``."""
    from monai.networks.nets import ViT

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(cfg.init_seed))
        return ViT(in_channels=1, img_size=tuple(cfg.input_size), patch_size=tuple(cfg.patch_size), spatial_dims=3,
                   classification=False, **dict(cfg.vit))
    finally:
        torch.random.set_rng_state(state)


class LeJEPA3DModel(nn.Module):
    """MONAI ViT + projector; ``embed`` is the mean patch token ``(B, hidden)``."""

    def __init__(self, cfg: LeJEPA3DConfig) -> None:
        super().__init__()
        self.encoder = build_encoder_3d(cfg)
        width = int(cfg.vit["hidden_size"])
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(int(cfg.init_seed) + 1)
            self.projector = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, cfg.proj_dim))
        finally:
            torch.random.set_rng_state(state)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)
        return tokens.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.embed(x))


def volume_views(vols: Sequence[torch.Tensor], cfg: LeJEPA3DConfig, *, seed: int) -> torch.Tensor:
    """``(views, B, 1, D, H, W)`` random crops of ``vols`` (each ``(D, H, W)`` in [0, 1]), from ``seed`` alone."""
    g = torch.Generator().manual_seed(int(seed))
    lo, hi = cfg.crop_scale
    out = torch.empty((cfg.views, len(vols), 1, *cfg.input_size), dtype=torch.float32)
    for v in range(cfg.views):
        for b, vol in enumerate(vols):
            u = torch.rand(8, generator=g)
            box = []
            for ax in range(3):
                n = vol.shape[ax]
                size = max(1, int(round(n * float(lo + (hi - lo) * u[ax]))))
                start = int((n - size) * float(u[3 + ax]))
                box.append(slice(start, start + size))
            crop = vol[box[0], box[1], box[2]][None, None]
            crop = F.interpolate(crop, size=tuple(cfg.input_size), mode="trilinear", align_corners=False)[0]
            if u[6] < 0.5:
                crop = crop.flip(-1)
            out[v, b] = (crop - 0.5) * (0.6 + 0.8 * float(u[7])) / 0.5  # contrast jitter, then [0, 1] -> [-1, 1]
    return out


def pretrain_3d(volumes: Sequence[np.ndarray], cfg: LeJEPA3DConfig, *, seed: int,
                device: str = "cpu") -> tuple[LeJEPA3DModel, np.ndarray]:
    """Pretrain the 3-D encoder on ``volumes`` (training patients' only); returns the model and ``(steps, 3)``
    total / SIGReg / prediction losses. Deterministic given ``seed`` (batches, crops, directions per step)."""
    if len(volumes) < cfg.batch_size:
        raise ValueError(f"{len(volumes)} volumes < batch_size {cfg.batch_size}")
    dev = torch.device(device)
    vols = [torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in volumes]
    model = LeJEPA3DModel(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = np.zeros((cfg.steps, 3))
    model.train()
    for step in range(cfg.steps):
        rng = np.random.default_rng([seed, step])
        idx = np.sort(rng.choice(len(vols), size=cfg.batch_size, replace=False))
        views = volume_views([vols[i] for i in idx], cfg, seed=int(rng.integers(2**62))).to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            z = model(views.flatten(0, 1)).view(cfg.views, cfg.batch_size, -1)
        gen = torch.Generator(device=dev).manual_seed(int(rng.integers(2**62)))
        parts = lejepa_loss(z, lam=cfg.lam, num_slices=cfg.num_slices, generator=gen)
        if not torch.isfinite(parts["loss"]):
            raise FloatingPointError(f"3-D LeJEPA loss is not finite at step {step}")
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        losses[step] = [float(parts[k].detach()) for k in ("loss", "sigreg", "pred")]
    return model, losses
