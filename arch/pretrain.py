"""The LeJEPA pretraining loop: deterministic per step, periodic safetensors checkpoints, resumable after a kill.

Everything random in step ``s`` (which images, their views, SIGReg's directions) is drawn from ``(seed, s)``
alone, and the learning rate is a function of ``s``; a checkpoint therefore only has to hold the model and the
AdamW moments. Resuming from step ``k`` and training to ``n`` gives the same weights, bit for bit on the same
machine, as an unbroken run to ``n`` (tested).

Checkpoints live in ``out_dir/step<NNNNNN>/weights.safetensors`` with ``out_dir/manifest.json`` listing each one
with its sha256 and its collapse monitor (SIGReg of the projected clean training images at fixed directions,
RankMe of the encoder embeddings, per-dimension std). The layout is the token bank's (a manifest with
``shards``), so the HF Jobs backend uploads and restores checkpoints exactly like bank shards. A checkpoint whose
bytes do not match the manifest is an error, never a silent restart.

The loop only ever sees the images it is given; callers give it training patients' images (and the job checks
the ids). No mask, no label.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .lejepa import LeJEPAConfig, LeJEPAModel, build_encoder, images_to_tensor, lejepa_loss, make_views
from .sigreg import sigreg

__all__ = ["PretrainResult", "pretrain", "resume", "rankme", "load_encoder_state", "CheckpointError", "MANIFEST",
           "encoder_state_from_checkpoint"]

log = logging.getLogger("covtoken.pretrain")
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint on disk does not match its manifest, or belongs to another run."""


@dataclass(frozen=True)
class PretrainResult:
    """What the pretraining stage hands on.

    Attributes:
        checkpoints: manifest entries in step order (``step``, ``path``, ``sha256``, ``monitor``).
        image_ids: the ids of every image the loop could draw from (sorted) - the leak check reads this.
        losses: ``(steps, 3)`` total / SIGReg / prediction loss per step (the steps run in this process and
            restored from earlier attempts' manifests are marked NaN where not known).
        resumed_from: step of the checkpoint the loop restarted from (0 for a fresh run).
        seconds: wall time of this call.
    """

    checkpoints: list[dict]
    image_ids: list[str]
    losses: np.ndarray
    resumed_from: int
    seconds: float


def rankme(z: np.ndarray | torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): ``exp`` of the entropy of the normalised singular values of ``z`` (n, d)."""
    s = torch.linalg.svdvals(torch.as_tensor(np.asarray(z), dtype=torch.float64))
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _lr(step: int, cfg: LeJEPAConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _state_tensors(model: LeJEPAModel, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"optim.{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    return out


def _restore(model: LeJEPAModel, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    params = dict(model.named_parameters())
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            name, _, field = k[6:].rpartition(".")
            state.setdefault(params[name], {})[field] = v.clone()
    opt.state.clear()
    for p, st in state.items():
        opt.state[p] = st


def encoder_state_from_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's weights (timm keys) from a pretraining checkpoint."""
    return {k[len("model.encoder."):]: v for k, v in load_file(str(path)).items() if k.startswith("model.encoder.")}


def load_encoder_state(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a checkpoint's encoder weights into a timm model of the same architecture (strict)."""
    model.load_state_dict(encoder_state_from_checkpoint(path), strict=True)
    return model


def _read_manifest(out_dir: Path, run_key: str) -> dict:
    path = out_dir / MANIFEST
    if not path.exists():
        return {"run_key": run_key, "shards": []}
    doc = json.loads(path.read_text())
    if doc.get("run_key") != run_key:
        raise CheckpointError(f"{path}: checkpoints of another run ({doc.get('run_key')}); expected {run_key}. "
                              "Use a fresh --work-dir or delete the folder to start over")
    return doc


def optimise_step(opt: torch.optim.Optimizer, parts: Mapping[str, torch.Tensor], losses: np.ndarray, step: int,
                  progress: "_Progress") -> int:
    """Backward and optimiser step of one LeJEPA step (2-D and 3-D loops alike); returns the steps done."""
    opt.zero_grad(set_to_none=True)
    parts["loss"].backward()
    opt.step()
    losses[step] = [float(parts[k].detach()) for k in ("loss", "sigreg", "pred")]
    progress.update(step + 1, losses[step])
    return step + 1


def keep_checkpoint(entry: dict, out: Path, manifest: dict, on_checkpoint: Callable[[Path], None] | None) -> None:
    """Add a saved checkpoint to the manifest (written atomically) and hand its folder to ``on_checkpoint``."""
    manifest["shards"].append(entry)
    _write_manifest(out, manifest)
    if on_checkpoint is not None:
        on_checkpoint(out / Path(entry["path"]).parent)


def _write_manifest(out_dir: Path, doc: dict) -> None:
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, out_dir / MANIFEST)


def resume(out: Path, run_key: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
           steps: int) -> tuple[dict, int, np.ndarray]:
    """Restore ``model`` and ``opt`` from the last checkpoint in ``out`` (2-D and 3-D loops alike).

    Returns:
        ``(manifest, start_step, losses)``: the manifest (empty for a fresh folder), the step to continue from, and
        ``(steps, 3)`` losses filled from the manifest (NaN elsewhere).

    Raises:
        CheckpointError: the folder belongs to another run, or the last checkpoint is missing or its bytes differ.
    """
    manifest = _read_manifest(out, run_key)
    start = 0
    if manifest["shards"]:
        last = manifest["shards"][-1]
        path = out / last["path"]
        if not path.is_file() or _sha256(path) != last["sha256"]:
            raise CheckpointError(f"{path}: missing or its sha256 differs from {out / MANIFEST}; refusing to resume "
                                  "(delete the folder to start over)")
        _restore(model, opt, load_file(str(path)))
        start = int(last["step"])
        log.info(json.dumps({"event": "pretrain_resume", "step": start, "checkpoint": str(path)}))
    losses = np.full((steps, 3), np.nan)
    for sh in manifest["shards"]:
        for i, row in enumerate(sh.get("losses", [])):
            losses[sh["first_step"] + i] = row
    return manifest, start, losses


@torch.no_grad()
def _monitor(model: LeJEPAModel, clean: torch.Tensor, cfg: LeJEPAConfig, device: torch.device) -> dict:
    model.eval()
    h = torch.cat([model.embed(clean[i:i + 64].to(device)).float().cpu() for i in range(0, len(clean), 64)])
    z = model.projector(h.to(device)).float().cpu()
    model.train()
    std = h.std(0)
    g = torch.Generator().manual_seed(12345)  # fixed directions: comparable across checkpoints
    return {"sigreg_projected": float(sigreg(z, num_slices=cfg.num_slices, generator=g, t_max=cfg.t_max,
                                             knots=cfg.knots)),
            "rankme_embedding": rankme(h), "embedding_dim": int(h.shape[1]),
            "per_dim_std": {"min": float(std.min()), "median": float(std.median()), "max": float(std.max())},
            "n_images": int(len(clean))}


def pretrain(images: Sequence[np.ndarray], image_ids: Sequence[str], cfg: LeJEPAConfig, *, out_dir: str | Path,
             seed: int, mean: Sequence[float], std: Sequence[float], device: str = "cpu",
             on_checkpoint: Callable[[Path], None] | None = None, stop_after: int | None = None) -> PretrainResult:
    """Pretrain an encoder with LeJEPA on ``images``, resuming from the last verified checkpoint in ``out_dir``.

    Args:
        images: the training images (common layout, [0, 1]); the only pixels the loop sees.
        image_ids: their ids (recorded; duplicates refused).
        cfg: protocol parameters.
        out_dir: checkpoint folder (created; a folder of another run is refused).
        seed: the run's seed (batches, views, directions).
        mean, std: input normalisation of the encoder.
        device: ``cpu`` or ``cuda`` (bf16 autocast on CUDA only).
        on_checkpoint: called with each new checkpoint folder (the HF Jobs backend uploads it).
        stop_after: stop after this step as if killed (tests); the checkpoints written so far stay.

    Returns:
        :class:`PretrainResult`.
    """
    t0 = time.perf_counter()
    ids = list(image_ids)
    if len(ids) != len(images) or len(set(ids)) != len(ids):
        raise ValueError("image_ids must be unique and match the images one to one")
    if len(ids) < cfg.batch_size:
        raise ValueError(f"{len(ids)} training images < batch_size {cfg.batch_size}")
    dev = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = images_to_tensor(images, cfg.global_size)
    order = np.argsort(ids, kind="stable")  # the loop indexes images in id order: input order cannot matter
    pixels, ids = pixels[order], [ids[i] for i in order]
    # the folder belongs to one (protocol, seed, images): same ids with other pixels are another run
    run_key = hashlib.sha256(json.dumps({"cfg": cfg.as_dict(), "seed": seed, "ids": ids, "mean": list(mean),
                                         "std": list(std)}, sort_keys=True).encode()
                             + pixels.numpy().tobytes()).hexdigest()
    clean = (pixels[np.linspace(0, len(ids) - 1, min(cfg.monitor_images, len(ids))).astype(int)]
             - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    model = LeJEPAModel(build_encoder(cfg.encoder, init_seed=cfg.init_seed), proj_hidden=cfg.proj_hidden,
                        proj_dim=cfg.proj_dim, init_seed=cfg.init_seed).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    manifest, start, losses = resume(out, run_key, model, opt, cfg.steps)
    model.train()
    amp = dev.type == "cuda"
    progress = _Progress(cfg.steps, start)
    first = start
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([seed, step])
        idx = np.sort(rng.choice(len(ids), size=cfg.batch_size, replace=False))
        g_views, l_views = make_views(pixels[idx], cfg, mean, std, seed=int(rng.integers(2**62)))
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            zs = [model(g_views.flatten(0, 1).to(dev)).view(cfg.global_views, cfg.batch_size, -1)]
            if l_views is not None:
                zs.append(model(l_views.flatten(0, 1).to(dev)).view(cfg.local_views, cfg.batch_size, -1))
        gen = torch.Generator(device=dev).manual_seed(int(rng.integers(2**62)))
        parts = lejepa_loss(torch.cat(zs), lam=cfg.lam, num_slices=cfg.num_slices, generator=gen,
                            t_max=cfg.t_max, knots=cfg.knots)
        if not torch.isfinite(parts["loss"]):
            raise FloatingPointError(f"LeJEPA loss is not finite at step {step}: {parts}")
        done = optimise_step(opt, parts, losses, step, progress)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            keep_checkpoint(_save(model, opt, cfg, out, done, first, losses[first:done], clean, dev), out, manifest,
                            on_checkpoint)
            first = done
        if stop_after is not None and done >= stop_after:
            break
    progress.close()
    return PretrainResult(list(manifest["shards"]), ids, losses, start, round(time.perf_counter() - t0, 3))


def _save(model: LeJEPAModel, opt: torch.optim.Optimizer, cfg: LeJEPAConfig, out: Path, step: int, first: int,
          losses: np.ndarray, clean: torch.Tensor, dev: torch.device) -> dict:
    folder = out / f"step{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.tmp"
    # one metadata key: safetensors stores metadata in a hash map, so several keys come out in a random order
    save_file(_state_tensors(model, opt), str(tmp), metadata={"covtoken": f"lejepa/1 step={step}"})
    os.replace(tmp, folder / WEIGHTS)
    mon = _monitor(model, clean, cfg, dev)
    entry = {"step": step, "path": f"{folder.name}/{WEIGHTS}", "sha256": _sha256(folder / WEIGHTS),
             "first_step": first, "losses": np.round(losses, 6).tolist(), "monitor": mon}
    log.info(json.dumps({"event": "checkpoint", "step": step, "sha256": entry["sha256"], **mon}))
    return entry


class _Progress:
    """Step / ETA on a terminal (rich), one JSON log line per 10% otherwise."""

    def __init__(self, total: int, start: int) -> None:
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("LeJEPA"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[loss]}"))
            self.task = self.bar.add_task("pretrain", total=total, completed=start, loss="")
            self.bar.start()

    def update(self, done: int, row: np.ndarray) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=f"loss {row[0]:.3f} sigreg {row[1]:.2f}")
            return
        if done == self.total or (done - self.start) % max(1, self.total // 10) == 0:
            rate = (time.perf_counter() - self.t0) / max(1, done - self.start)
            log.info(json.dumps({"event": "pretrain_progress", "step": done, "of": self.total,
                                 "eta_seconds": round(rate * (self.total - done), 1), "loss": round(float(row[0]), 4),
                                 "sigreg": round(float(row[1]), 4), "pred": round(float(row[2]), 4)}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
