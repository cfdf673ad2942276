"""The training recipe: frozen-backbone head epochs, then fine-tuning with layer-wise LR decay and weight EMA.

Stage 1 (``frozen_epochs``): the backbone is frozen; AdamW trains the head and metadata branch at ``lr_head`` with a
cosine schedule. Stage 2 (``finetune_epochs``): everything trains; parameter groups come from timm's
``param_groups_layer_decay`` (each backbone block's LR scaled by ``layer_decay`` per block below the top; head and
metadata branch at the full ``lr``; no weight decay on 1-D parameters), AdamW with a per-step cosine schedule, and
an exponential moving average of the weights (timm ``ModelEmaV3``) that is the model returned. bf16 autocast and
gradient checkpointing are used on CUDA only (the recipe's ``*_on_gpu`` switches); on CPU training is fp32.
The shuffling and augmentation draw from a generator seeded by ``seed``, so a run is repeatable on CPU.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

from .model import LesionClassifier

__all__ = ["TrainResult", "train_classifier", "predict_logits"]

log = logging.getLogger("covtoken.classifier.train")


@dataclass
class TrainResult:
    model: LesionClassifier            # the EMA weights after fine-tuning (the live weights when there is none)
    history: list[dict] = field(default_factory=list)
    used_ema: bool = False
    bf16: bool = False
    grad_checkpointing: bool = False


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _augment(x: torch.Tensor, ops: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    for op, dim in (("hflip", 3), ("vflip", 2)):
        if op in ops:
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            if flip.any():
                x = x.clone()
                x[flip] = torch.flip(x[flip], dims=[dim])
    return x


def _epochs(model: LesionClassifier, params: list, *, pixels: torch.Tensor, meta: torch.Tensor | None,
            y: torch.Tensor, epochs: int, recipe: Mapping, gen: torch.Generator, device: torch.device,
            bf16: bool, ema: object | None, stage: str, history: list[dict]) -> None:
    opt = torch.optim.AdamW(params)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    n, bs = len(y), int(recipe["batch_size"])
    steps_per_epoch = math.ceil(n / bs)
    total, step = epochs * steps_per_epoch, 0
    smoothing = float(recipe.get("label_smoothing", 0.0))
    aug = tuple(recipe.get("augment", ()))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        losses = []
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            xb = _augment(pixels[idx], aug, gen).to(device)
            mb = None if meta is None else meta[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _cosine(step, total)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb, mb)
            loss = F.cross_entropy(logits.float(), y[idx].to(device), label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 5.0)
            opt.step()
            step += 1
            if ema is not None:
                ema.update(model, step=step)
            losses.append(float(loss.detach()))
        history.append({"stage": stage, "epoch": epoch, "loss": sum(losses) / len(losses)})
        log.info("%s epoch %d loss %.4f", stage, epoch, history[-1]["loss"])


def train_classifier(model: LesionClassifier, *, pixels: torch.Tensor, meta: torch.Tensor | None, y: torch.Tensor,
                     recipe: Mapping, seed: int, device: str = "cpu") -> TrainResult:
    """Train ``model`` (in place) with the recipe; returns the model to evaluate (EMA weights when fine-tuned).

    Args:
        model: the classifier (backbone + metadata branch + head).
        pixels: ``(N, 3, S, S)`` preprocessed training images (CPU; moved per batch).
        meta: ``(N, meta_dim)`` encoded questionnaire, or None without a metadata branch.
        y: ``(N,)`` int64 class indices.
        recipe: the config's ``recipe`` block.
        seed: seeds the initialisation of the head, the shuffling and the augmentation.
        device: ``"cpu"`` or ``"cuda"``.
    """
    from timm.optim import param_groups_layer_decay
    from timm.utils import ModelEmaV3

    if len(y) != len(pixels) or (meta is not None and len(meta) != len(y)):
        raise ValueError(f"pixels {len(pixels)}, metadata {None if meta is None else len(meta)} and labels {len(y)} "
                         "differ in length")
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    bf16 = gpu and bool(recipe.get("bf16_on_gpu", True))
    ckpt = gpu and bool(recipe.get("grad_checkpointing_on_gpu", True))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(dev)
    result = TrainResult(model=model, bf16=bf16, grad_checkpointing=ckpt)
    wd = float(recipe["weight_decay"])

    if int(recipe["frozen_epochs"]) > 0:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        params = [{"params": model.head_parameters(), "lr": float(recipe["lr_head"]), "weight_decay": wd}]
        _epochs(model, params, pixels=pixels, meta=meta, y=y, epochs=int(recipe["frozen_epochs"]), recipe=recipe,
                gen=gen, device=dev, bf16=bf16, ema=None, stage="frozen", history=result.history)
    for p in model.parameters():
        p.requires_grad_(True)
    if int(recipe["finetune_epochs"]) > 0:
        if ckpt:
            model.backbone.set_grad_checkpointing(True)
        groups = param_groups_layer_decay(model, weight_decay=wd, layer_decay=float(recipe["layer_decay"]))
        for g in groups:
            g["lr"] = float(recipe["lr"]) * float(g.get("lr_scale", 1.0))
        ema = ModelEmaV3(model, decay=float(recipe["ema_decay"]), device=dev)
        _epochs(model, groups, pixels=pixels, meta=meta, y=y, epochs=int(recipe["finetune_epochs"]), recipe=recipe,
                gen=gen, device=dev, bf16=bf16, ema=ema, stage="finetune", history=result.history)
        if ckpt:
            model.backbone.set_grad_checkpointing(False)
        ema_model = ema.module
        ema_model.backbone = _retie(ema_model.backbone, model.backbone)
        result.model, result.used_ema = ema_model, True
    result.model.eval()
    return result


def _retie(ema_backbone: torch.nn.Module, live: torch.nn.Module) -> torch.nn.Module:
    """deepcopy keeps the FeatureBackbone's plain attributes; make sure they are the live module's values."""
    for attr in ("kind", "num_features", "data_config", "arch_config", "source"):
        setattr(ema_backbone, attr, copy.deepcopy(getattr(live, attr)))
    return ema_backbone


@torch.inference_mode()
def predict_logits(model: LesionClassifier, pixels: torch.Tensor, meta: torch.Tensor | None, *,
                   batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """``(N, n_classes)`` float32 logits on CPU, in eval mode, fp32 (also on GPU: evaluation is never autocast)."""
    model.eval()
    dev = torch.device(device)
    out = []
    for start in range(0, len(pixels), batch_size):
        mb = None if meta is None else meta[start:start + batch_size].to(dev)
        out.append(model(pixels[start:start + batch_size].to(dev), mb).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, model.head[-1].out_features))
