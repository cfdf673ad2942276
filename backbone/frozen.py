"""A frozen backbone: registry spec + model in eval mode + preprocessing + patch-token extraction.

Token convention (recorded with every run): block indices are 0-based (block ``depth - 1`` is the last);
tokens are the *output of the block*, before the model's final norm unless ``final_norm=True``; CLS and
register tokens are stripped, so each image gives ``grid[0] * grid[1]`` patch tokens in row-major order.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .preprocess import PREPROCESS_ATTR, LibraryTransform, timm_transform
from .registry import BackboneSpec, get_spec

__all__ = ["FrozenBackbone", "load_backbone", "all_finite", "state_dict_digest", "attach_source", "SOURCE_ATTR"]

log = logging.getLogger(__name__)

#: Attribute a builder sets on the module it returns to say where the weights came from (see attach_source).
SOURCE_ATTR = "covtoken_source"


def attach_source(model: torch.nn.Module, *, origin: str, resolved_revision: str | None,
                  files: dict[str, str] | None = None) -> torch.nn.Module:
    """Record on ``model`` where its weights came from, for the gate record.

    Args:
        model: the built module.
        origin: ``"hub"`` (fetched through the Hub client) or ``"override:<path>"`` (a local ``weights=``).
        resolved_revision: the commit actually served (from the snapshot path), None for local overrides.
        files: file name -> ``"sha256:<hex>"`` of the weight files read.
    """
    setattr(model, SOURCE_ATTR, {"origin": origin, "resolved_revision": resolved_revision, "files": dict(files or {})})
    return model


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every tensor in the state dict."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of ``t`` is NaN or infinite; exact, and one cheap reduction in the common case.

    A NaN or infinity anywhere makes the float32-accumulated sum non-finite, so a finite sum proves every element
    finite; only a non-finite sum (NaN/Inf present, or finite values whose sum overflows) takes the elementwise test.
    """
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(t).all())


class FrozenBackbone:
    """A model that never trains, with the preprocessing of its spec.

    Args:
        spec: registry entry.
        model: the built module; it is put in eval mode and its parameters frozen.
        device: where the forward pass runs.
    """

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, *, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights_digest = state_dict_digest(self.model)
        self.source = dict(getattr(model, SOURCE_ATTR, None) or {})
        self._transform: LibraryTransform | None = getattr(model, PREPROCESS_ATTR, None)

    @property
    def transform(self) -> LibraryTransform:
        """The library transform the builder attached; for a bare timm model, timm's own (resolved on first use).

        Raises:
            ValueError: a non-timm model whose builder attached none, or a library mean/std the spec disagrees with.
        """
        if self._transform is None:
            if self.spec.library != "timm":
                raise ValueError(f"{self.spec.name}: the builder attached no library transform "
                                 "(covtoken.backbone.preprocess.attach_preprocess)")
            self._transform = timm_transform(self.model, name=self.spec.name, image_size=self.spec.image_size,
                                             mean=self.spec.mean, std=self.spec.std)
        return self._transform

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.grid

    @property
    def weights_verified(self) -> bool:
        """True when the weights are a pinned pretrained checkpoint whose file digest matched the registry."""
        from .registry import pinned_digest_verified

        return pinned_digest_verified(self.spec, origin=self.source.get("origin", "unknown" if self.spec.hub_id
                                                                         else "embedded"),
                                      resolved_revision=self.source.get("resolved_revision"),
                                      files=self.source.get("files", {}))[0]

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Images in the common layout -> ``(B, 3, S, S)`` float32 tensor, by the library's own transform.

        See :mod:`covtoken.backbone.preprocess`: 8-bit PIL images (grey repeated to three channels) go through the
        transform the model's library resolves from its data config, squashed to the square input (no crop).
        """
        x = self.transform(images)
        side = self.spec.image_size
        if tuple(x.shape[1:]) != (3, side, side):
            raise RuntimeError(f"{self.spec.name}: the library transform gave {tuple(x.shape)}, expected (B, 3, {side}, {side})")
        return x.to(self.device)

    @torch.inference_mode()
    def patch_tokens(self, pixels: torch.Tensor, blocks: Sequence[int], *, final_norm: bool = False) -> dict[int, torch.Tensor]:
        """Patch tokens of the requested blocks.

        Args:
            pixels: ``(B, 3, S, S)`` output of :meth:`preprocess`.
            blocks: 0-based block indices in ``[0, depth)``.
            final_norm: apply the model's final LayerNorm to the block outputs.

        Returns:
            ``{block: (B, N, d) float32 tensor on CPU}`` with ``N = grid[0] * grid[1]``.
        """
        blocks = sorted(set(int(b) for b in blocks))
        bad = [b for b in blocks if not 0 <= b < self.spec.depth]
        if bad:
            raise ValueError(f"{self.spec.name}: block indices {bad} outside [0, {self.spec.depth})")
        from .extract import extract_patch_tokens

        out = extract_patch_tokens(self, pixels, blocks, final_norm=final_norm)
        n = self.grid[0] * self.grid[1]
        for b, t in out.items():
            if t.shape[1] != n or t.shape[2] != self.spec.width:
                raise RuntimeError(f"{self.spec.name}: block {b} gave tokens {tuple(t.shape)}, expected (B, {n}, {self.spec.width})")
            if not all_finite(t):
                raise FloatingPointError(f"{self.spec.name}: block {b} produced NaN/Inf tokens")
        return {b: t.float().cpu() for b, t in out.items()}

    def provenance(self, *, blocks: Sequence[int], final_norm: bool) -> dict:
        """Backbone fields of a gate record.

        ``revision`` is the commit the weights were actually fetched at (``resolved_revision``, read from the Hub
        snapshot) when the builder reports one, else the registry's pinned revision; ``pinned_revision`` keeps the
        registry value (None for entries registered with ``revision_pinned=False``).
        """
        prov = self.spec.provenance()
        resolved = self.source.get("resolved_revision")
        prov.update({"weights_digest": self.weights_digest, "blocks": sorted(set(int(b) for b in blocks)),
                     "final_norm": bool(final_norm),
                     "preprocess": self.transform.provenance(),
                     "revision": resolved or self.spec.revision,
                     "pinned_revision": self.spec.revision,
                     "resolved_revision": resolved,
                     "weights_origin": self.source.get("origin", "unknown" if self.spec.hub_id else "embedded"),
                     "weights_files": self.source.get("files", {}),
                     "weights_verified": self.weights_verified})
        return prov


def load_backbone(name: str, *, weights: str | Path | None = None, revision: str | None = None,
                  device: str = "cpu") -> FrozenBackbone:
    """Build the registered backbone ``name`` and freeze it.

    Args:
        name: registry name (unknown names raise with the list of choices).
        weights: local folder or file replacing the Hub download (see :class:`BackboneSpec`).
        revision: 40-hex Hub commit sha replacing the pinned one; required for entries registered with
            ``revision_pinned=False``. Not allowed for backbones without Hub weights.
        device: ``"cpu"`` or ``"cuda"``.
    """
    spec = get_spec(name)
    kwargs = {}
    if revision is not None:
        if spec.hub_id is None:
            raise ValueError(f"{name} has no Hub weights; revision={revision!r} does not apply")
        kwargs["revision"] = revision
    log.info("building backbone %s (%s %s @ %s)", name, spec.library, spec.hub_id, revision or spec.revision)
    model = spec.builder(spec=spec, weights=weights, **kwargs)
    return FrozenBackbone(spec, model, device=device)
