"""``tiny-vit-lejepa``: the embedded tiny ViT after LeJEPA pretraining on the embedded CT phantoms (gate G8).

Same architecture, geometry and preprocessing as ``tiny-vit``; the weights are the encoder of the checkpoint the G8
embedded run chose on validation patients, shipped with the package (1.4 MB) and pinned by the sha256 of the file.
The builder refuses a file whose digest differs. Its model card (``weights/tiny-vit-lejepa.md``) is generated from
the G8 record. To rebuild the file, run ``python jobs/g8_lejepa_pretrain.py --smoke`` at the recorded commit and take
``artefacts/<run_id>/encoder.safetensors`` (pretraining is deterministic per step on one machine; a rebuild elsewhere
may differ in the last bits, and then the digest check says so).

This is a flow-check backbone: it has learned from synthetic phantoms, not from real images.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .frozen import attach_source
from .registry import BackboneSpec, register, weights_dir
from .tiny import TINY_VIT, build_tiny_vit

WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "tiny-vit-lejepa.safetensors"
#: sha256 of the shipped weights file (the encoder of the chosen checkpoint of the G8 embedded run).
WEIGHTS_SHA256 = "01f3a236c87a1ceaa2bb28c9fdd8938cb4c4a4f0b905d73fff3fe6ba8e82d37b"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_tiny_vit_lejepa(*, spec: BackboneSpec, weights: str | Path | None = None) -> torch.nn.Module:
    """The tiny ViT with the LeJEPA-pretrained weights, verified against the pinned sha256 and loaded strictly.

    Args:
        spec: the registry entry.
        weights: another copy of the weights file (it must have the same digest).
    """
    from safetensors.torch import load_file

    path = weights_dir(weights) or WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name}: weights file {path} is missing; rebuild it with "
                                "`python jobs/g8_lejepa_pretrain.py --smoke` (see covtoken.backbone.trained)")
    digest = _sha256(path)
    if digest != spec.weights_sha256:
        raise ValueError(f"{spec.name}: {path} has sha256 {digest}, the registry pins {spec.weights_sha256}")
    model = build_tiny_vit(spec=TINY_VIT)
    model.load_state_dict(load_file(str(path)), strict=True)
    return attach_source(model, origin=f"file:{path.name}", resolved_revision=None, files={path.name: f"sha256:{digest}"})


TINY_VIT_LEJEPA = register(
    BackboneSpec(
        name="tiny-vit-lejepa",
        library="timm",
        hub_id=None,
        revision=None,
        image_size=TINY_VIT.image_size,
        patch_size=TINY_VIT.patch_size,
        depth=TINY_VIT.depth,
        width=TINY_VIT.width,
        num_prefix_tokens=1,
        num_registers=0,
        mean=TINY_VIT.mean,
        std=TINY_VIT.std,
        builder=build_tiny_vit_lejepa,
        weights_sha256=WEIGHTS_SHA256,
        modality="CT phantoms (embedded default; flow check)",
        licence="Apache-2.0 (weights trained by the kit on its own synthetic phantoms)",
        notes="tiny-vit pretrained with LeJEPA (SIGReg) on the embedded CT phantoms' training patients by gate G8; "
              "model card: covtoken/backbone/weights/tiny-vit-lejepa.md",
    )
)
