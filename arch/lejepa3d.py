"""LeJEPA on volumes: MONAI's ViT (``spatial_dims=3``) on random volumetric crops, with the 2-D job's loss.

Slices in the common layout are stacked into volumes with :func:`covtoken.arch.volumetric.group_volumes` (volume =
series or patient id, slices ordered by position). Each step draws ``batch_size`` volumes and, per volume,
``views`` random 3-D crops (a random box of ``crop_scale`` of each axis' extent, resized trilinearly to the
encoder's input), flips and an intensity jitter - all from ``(seed, step)``. The encoder is
``monai.networks.nets.ViT`` (no hand-written transformer); a volume's embedding is the mean of its patch tokens.
The loss is :func:`covtoken.arch.lejepa.lejepa_loss` (SIGReg + view prediction, no teacher, no stop-gradient).

With ``out_dir``, training checkpoints and resumes exactly like the 2-D loop (:mod:`covtoken.arch.pretrain`, whose
checkpoint, manifest and collapse-monitor helpers it uses): safetensors every ``checkpoint_every`` steps with their
sha256 in a manifest, everything random in step ``s`` drawn from ``(seed, s)``, so a run killed and restarted gives
the same weights as an unbroken one. :func:`pretrain_volumes` is the label-free stage on a loaded dataset: it
stacks the *training* patients' slices into volumes and pretrains on them; it never reads a mask.
:func:`embed_volumes` gives the frozen volume embeddings the G8 job's volume-level evaluation reads (``--dims 3``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .lejepa import check_known_params, lejepa_loss
from .sigreg import DEFAULT_KNOTS, DEFAULT_T_MAX
from .volumetric import group_volumes

__all__ = ["LeJEPA3DConfig", "stack_volumes", "build_encoder_3d", "LeJEPA3DModel", "volume_views", "pretrain_3d",
           "Pretrain3DResult", "training_volumes", "patient_volumes", "pretrain_volumes", "volume_inputs",
           "embed_volumes", "model_from_checkpoint"]


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
    t_max: float = DEFAULT_T_MAX
    knots: int = DEFAULT_KNOTS
    checkpoint_every: int = 10
    monitor_volumes: int = 16

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "LeJEPA3DConfig":
        """Build from the locked ``pretraining`` parameters of a 3-D entry; an unknown key raises, naming it."""
        check_known_params(cls, params, what="3-D pretraining")
        merged = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items()}
        return cls(**merged)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (tuples as lists)."""
        return json.loads(json.dumps({f.name: (dict(v) if isinstance(v, Mapping) else v)
                                      for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}))


def stack_volumes(images: Sequence[np.ndarray], volume_ids: Sequence[str],
                  positions: Sequence[float]) -> tuple[list[np.ndarray], list[str]]:
    """Stack 2-D slices into ``(D, H, W)`` float32 volumes (RGB averaged to grey), ordered by volume id.

    Raises:
        ValueError: slices of one volume differ in shape (from ``group_volumes``: duplicate positions).
    """
    groups = group_volumes(volume_ids, positions)
    return _stack_groups(images, groups), [v.volume_id for v in groups]


def _stack_groups(images: Sequence[np.ndarray], groups: Sequence[Any]) -> list[np.ndarray]:
    """One ``(D, H, W)`` volume per group of :func:`~covtoken.arch.volumetric.group_volumes`, slices in its order."""
    vols = []
    for v in groups:
        sl = [np.asarray(images[r], dtype=np.float32) for r in v.rows]
        sl = [s.mean(-1) if s.ndim == 3 else s for s in sl]
        if len({s.shape for s in sl}) != 1:
            raise ValueError(f"volume {v.volume_id!r}: slices of different shapes {sorted({s.shape for s in sl})}")
        vols.append(np.stack(sl))
    return vols


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


@dataclass(frozen=True)
class Pretrain3DResult:
    """What 3-D pretraining hands on.

    Attributes:
        model: the trained encoder + projector.
        losses: ``(steps, 3)`` total / SIGReg / prediction loss per step (NaN where an earlier attempt ran it and
            the manifest does not hold it; never when checkpoints are on).
        volume_ids: ids of every volume the loop could draw from (sorted) - the leak check reads them.
        checkpoints: manifest entries in step order (``step``, ``path``, ``sha256``, ``monitor``); empty without
            ``out_dir``.
        resumed_from: step of the checkpoint the loop restarted from (0 for a fresh run).
        seconds: wall time of this call.
    """

    model: LeJEPA3DModel
    losses: np.ndarray
    volume_ids: list[str]
    checkpoints: list[dict]
    resumed_from: int
    seconds: float


def volume_inputs(vols: Sequence[torch.Tensor | np.ndarray], cfg: LeJEPA3DConfig) -> torch.Tensor:
    """``(n, 1, D, H, W)`` whole volumes (no crop, no jitter) resized to the encoder's input, [0, 1] -> [-1, 1]."""
    x = torch.stack([F.interpolate(torch.as_tensor(np.asarray(v, dtype=np.float32))[None, None],
                                   size=tuple(cfg.input_size), mode="trilinear", align_corners=False)[0] for v in vols])
    return (x - 0.5) / 0.5


def _monitor_inputs(vols: Sequence[torch.Tensor], cfg: LeJEPA3DConfig) -> torch.Tensor:
    """Whole volumes at the encoder's input size, for the collapse monitor (an evenly spaced subset)."""
    pick = np.linspace(0, len(vols) - 1, min(cfg.monitor_volumes, len(vols))).astype(int)
    return volume_inputs([vols[i] for i in pick], cfg)


@torch.no_grad()
def embed_volumes(model: LeJEPA3DModel, vols: Sequence[np.ndarray], cfg: LeJEPA3DConfig, *, batch_size: int = 16,
                  device: str = "cpu") -> np.ndarray:
    """Frozen embeddings ``(n, hidden)`` float32 of whole volumes: the encoder's mean patch token (no projector)."""
    model = model.to(device).eval()
    out = [model.embed(volume_inputs(vols[i:i + batch_size], cfg).to(device)).float().cpu()
           for i in range(0, len(vols), batch_size)]
    return torch.cat(out).numpy().astype(np.float32)


def model_from_checkpoint(path: str | Path | None, cfg: LeJEPA3DConfig) -> LeJEPA3DModel:
    """The encoder + projector of a 3-D checkpoint (strict), or the random initialisation when ``path`` is None."""
    model = LeJEPA3DModel(cfg)
    if path is not None:
        from safetensors.torch import load_file

        model.load_state_dict({k[6:]: v for k, v in load_file(str(path)).items() if k.startswith("model.")},
                              strict=True)
    return model


def pretrain_3d(volumes: Sequence[np.ndarray], cfg: LeJEPA3DConfig, *, seed: int,
                volume_ids: Sequence[str] | None = None, out_dir: str | Path | None = None, device: str = "cpu",
                on_checkpoint: Callable[[Path], None] | None = None,
                stop_after: int | None = None) -> Pretrain3DResult:
    """Pretrain the 3-D encoder on ``volumes`` (training patients' only), resuming from ``out_dir`` when given.

    Deterministic given ``seed``: batches, crops and SIGReg directions of step ``s`` come from ``(seed, s)``, and
    volumes are indexed in id order, so neither the input order nor a kill-and-resume changes the weights.

    Args:
        volumes: ``(D, H, W)`` arrays in [0, 1].
        cfg: protocol parameters.
        seed: the run's seed.
        volume_ids: unique ids (default ``"0"``, ``"1"``, ...).
        out_dir: checkpoint folder (manifest + ``step<NNNNNN>/weights.safetensors``); None trains without.
        device: ``cpu`` or ``cuda`` (bf16 autocast on CUDA only).
        on_checkpoint: called with each new checkpoint folder (HF Jobs upload).
        stop_after: stop after this step as if killed (tests); checkpoints written so far stay.
    """
    from .pretrain import _Progress, _save, keep_checkpoint, optimise_step, resume

    t0 = time.perf_counter()
    ids = [str(i) for i in range(len(volumes))] if volume_ids is None else [str(v) for v in volume_ids]
    if len(ids) != len(volumes) or len(set(ids)) != len(ids):
        raise ValueError("volume_ids must be unique and match the volumes one to one")
    if len(volumes) < cfg.batch_size:
        raise ValueError(f"{len(volumes)} volumes < batch_size {cfg.batch_size}")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    ids = [ids[i] for i in order]
    vols = [torch.as_tensor(np.asarray(volumes[i], dtype=np.float32)) for i in order]
    dev = torch.device(device)
    model = LeJEPA3DModel(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = np.full((cfg.steps, 3), np.nan)
    manifest: dict = {"shards": []}
    start = 0
    out = None if out_dir is None else Path(out_dir)
    clean = _monitor_inputs(vols, cfg)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256(json.dumps({"cfg": cfg.as_dict(), "seed": seed, "ids": ids, "kind": "lejepa3d"},
                                      sort_keys=True).encode())
        for v in vols:
            h.update(v.numpy().tobytes())
        manifest, start, losses = resume(out, h.hexdigest(), model, opt, cfg.steps)  # another run's folder: refused
    model.train()
    progress = _Progress(cfg.steps, start)
    first = start
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([seed, step])
        idx = np.sort(rng.choice(len(vols), size=cfg.batch_size, replace=False))
        views = volume_views([vols[i] for i in idx], cfg, seed=int(rng.integers(2**62))).to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            z = model(views.flatten(0, 1)).view(cfg.views, cfg.batch_size, -1)
        gen = torch.Generator(device=dev).manual_seed(int(rng.integers(2**62)))
        parts = lejepa_loss(z, lam=cfg.lam, num_slices=cfg.num_slices, generator=gen, t_max=cfg.t_max,
                            knots=cfg.knots)
        if not torch.isfinite(parts["loss"]):
            raise FloatingPointError(f"3-D LeJEPA loss is not finite at step {step}")
        done = optimise_step(opt, parts, losses, step, progress)
        if out is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            keep_checkpoint(_save(model, opt, cfg, out, done, first, losses[first:done], clean, dev), out, manifest,
                            on_checkpoint)
            first = done
        if stop_after is not None and done >= stop_after:
            break
    progress.close()
    return Pretrain3DResult(model, losses, ids, list(manifest["shards"]), start, round(time.perf_counter() - t0, 3))


def training_volumes(items: Sequence[Any], train_patients: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """The training patients' slices stacked into volumes (one per patient, sorted by id).

    Slices are ordered by ``meta["slice_index"]`` where the loader gives one (the NIfTI volume loaders and the
    volume phantoms), else by image id (the 2-D phantoms' ``<patient>-sNN``). Only ``items`` of
    ``train_patients`` are read; no mask is touched.
    """
    vols, ids, _ = patient_volumes(items, train_patients, none="no training patient's slice to pretrain on")
    return vols, ids


def patient_volumes(items: Sequence[Any], patients: Sequence[str], *, none: str = "none of the patients has a slice"
                    ) -> tuple[list[np.ndarray], list[str], dict[str, list[str]]]:
    """The slices of ``patients`` stacked into one volume per patient (sorted by id), and each volume's slice ids
    in stacking order (the evaluation reads a volume's label from them); ``none`` is the error when no item is of
    ``patients``."""
    keep = set(patients)
    fit = sorted((it for it in items if it.patient_id in keep), key=lambda it: it.image_id)
    if not fit:
        raise ValueError(none)
    rank: dict[str, int] = {}
    positions = []
    for it in fit:
        if "slice_index" in it.meta:
            positions.append(float(it.meta["slice_index"]))
        else:
            positions.append(float(rank.setdefault(it.patient_id, 0)))
            rank[it.patient_id] += 1
    groups = group_volumes([it.patient_id for it in fit], positions)
    return (_stack_groups([it.image for it in fit], groups), [v.volume_id for v in groups],
            {v.volume_id: [fit[r].image_id for r in v.rows] for v in groups})


def pretrain_volumes(data: Any, splits: Mapping[str, Sequence[str]], cfg: LeJEPA3DConfig, *, seed: int,
                     out_dir: str | Path | None = None, device: str = "cpu",
                     on_checkpoint: Callable[[Path], None] | None = None,
                     stop_after: int | None = None) -> Pretrain3DResult:
    """The label-free 3-D stage on a loaded dataset: pretrain on the volumes of ``splits["train"]`` only.

    It receives the dataset as a job has it (sealed masks included) and must not depend on them
    (``tests/test_label_leak.py`` runs it with permuted and zeroed masks and requires bit-identical weights, and
    checks that it saw exactly the training patients' volumes).
    """
    vols, ids = training_volumes(data.items, splits["train"])
    return pretrain_3d(vols, cfg, seed=seed, volume_ids=ids, out_dir=out_dir, device=device,
                       on_checkpoint=on_checkpoint, stop_after=stop_after)
