"""Lesion-routed depth: tokens outside the lesion subspace exit early, the rest go through every block.

Every token (prefix included) runs blocks ``0..k`` (``k = exit_after``, 0-based; the notes' ``l0 = k + 1``).
A label-free router (the Mahalanobis density of training patients' block-``k`` tokens, or a PCA residual) scores
the patch tokens; the top ``ceil(f N)`` per image (``f`` = keep fraction; ties go to the lower token index), the
CLS token and any registers are gathered and run through blocks ``k+1..L-1``; their outputs are scattered back,
and exited tokens keep their block-``k`` representation. Nothing is masked: the routed blocks attend only among
routed tokens, so the saving is not overstated by skipped tokens that still serve as keys and values.

Built directly on timm's block modules: ``VisionTransformer`` and ``Eva`` (DINOv3 / MedDINOv3; the rotary
embedding of each routed patch is gathered with it). MACs: :mod:`covtoken.arch.flops`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..subspace import GaussianDensity, PCAResidual
from ..gate.keep import topk_keep
from .flops import ViTGeometry, keep_count

__all__ = ["GaussianRouter", "PCARouter", "make_router", "RoutedDepth", "RoutedOutput", "top_keep", "time_forwards",
           "lesion_routing"]


class GaussianRouter(torch.nn.Module):
    """Squared Mahalanobis distance ``||(x - mu) L||^2`` with the fitted Cholesky factor of the precision.

    Cost per token: one ``d x d`` product, ``d^2`` MACs (the squared norm is O(d), ignored like LayerNorm).
    The notes' budget of ``2 N d^2`` for Mahalanobis is twice this (a FLOP count, or a solve); this router
    runs the single product and the count says so.
    """

    def __init__(self, density: GaussianDensity, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if density.mean_ is None or density.chol_prec_ is None:
            raise ValueError("GaussianRouter needs a fitted GaussianDensity")
        self.register_buffer("mean", torch.as_tensor(density.mean_, dtype=dtype))
        self.register_buffer("chol", torch.as_tensor(np.ascontiguousarray(density.chol_prec_), dtype=dtype))
        self.macs_per_token = int(self.chol.shape[0] * self.chol.shape[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` -> ``(B, N)`` scores, higher = more lesion-like."""
        z = torch.matmul(tokens.to(self.chol.dtype) - self.mean, self.chol)
        return (z * z).sum(dim=-1)


class PCARouter(torch.nn.Module):
    """PCA residual ``||x - mu||^2 - ||(x - mu) V_k||^2``; ``d k`` MACs per token."""

    def __init__(self, residual: PCAResidual, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if residual.components_ is None or residual.mean_ is None:
            raise ValueError("PCARouter needs a fitted PCAResidual")
        self.register_buffer("mean", torch.as_tensor(residual.mean_, dtype=dtype))
        self.register_buffer("basis", torch.as_tensor(np.ascontiguousarray(residual.components_), dtype=dtype))
        self.macs_per_token = int(self.basis.shape[0] * self.basis.shape[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        xc = tokens.to(self.basis.dtype) - self.mean
        p = torch.matmul(xc, self.basis)
        return (xc * xc).sum(dim=-1) - (p * p).sum(dim=-1)


def make_router(scorer: object) -> torch.nn.Module:
    """Torch router for a fitted scorer from :mod:`covtoken.subspace` (kNN is not a router: N M d MACs)."""
    if isinstance(scorer, GaussianDensity):
        return GaussianRouter(scorer)
    if isinstance(scorer, PCAResidual):
        return PCARouter(scorer)
    raise TypeError(f"no router for {type(scorer).__name__}; use GaussianDensity or PCAResidual")


def top_keep(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Indices of the ``n_keep`` highest scores per row (ties -> lower index), sorted ascending.

    Args:
        scores: ``(n_images, N)``.
        n_keep: K in ``[1, N]``.

    Returns:
        ``(n_images, K)`` int64.
    """
    s = np.asarray(scores)
    if s.ndim != 2 or not 1 <= n_keep <= s.shape[1]:
        raise ValueError(f"need (n, N) scores and 1 <= n_keep <= N, got shape {s.shape}, n_keep={n_keep}")
    mask = topk_keep(s, n_keep)  # the one top-k rule of the kit (gate.keep), as ascending indices
    return np.nonzero(mask)[1].reshape(s.shape[0], n_keep).astype(np.int64)


@dataclass(frozen=True)
class RoutedOutput:
    """Result of :meth:`RoutedDepth.routed`.

    Attributes:
        tokens: ``(B, P + N, d)`` last-block outputs of routed and prefix tokens, block-``k`` outputs of the rest.
        kept: ``(B, K)`` routed patch-token indices (0-based over the N patches, ascending).
        scores: ``(B, N)`` router scores.
    """

    tokens: torch.Tensor
    kept: torch.Tensor
    scores: torch.Tensor


class RoutedDepth:
    """A frozen timm ViT run with lesion-routed depth.

    Args:
        model: timm ``VisionTransformer`` or ``Eva`` in eval mode.
        exit_after: k, the 0-based block after which unrouted tokens exit (``k < depth - 1``).
        keep: f, fraction of patch tokens routed through the remaining blocks.
        router: module mapping ``(B, N, d)`` block-k patch tokens to ``(B, N)`` scores, with ``macs_per_token``.
    """

    def __init__(self, model: torch.nn.Module, *, exit_after: int, keep: float, router: torch.nn.Module) -> None:
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, (VisionTransformer, Eva)):
            raise TypeError(f"routed depth supports timm VisionTransformer and Eva, got {type(model).__name__}")
        if getattr(model, "rope_mixed", False):
            raise TypeError("Eva with depth-dependent (mixed) rotary embeddings is not supported")
        depth = len(model.blocks)
        if not 0 <= exit_after < depth - 1:
            raise ValueError(f"exit_after={exit_after} must lie in [0, {depth - 1}) for a {depth}-block model")
        self.model, self.exit_after, self.keep, self.router = model, int(exit_after), float(keep), router
        self.is_eva = isinstance(model, Eva)
        self.num_prefix = int(model.num_prefix_tokens)
        self.n_patches = int(np.prod(model.patch_embed.grid_size))
        self.n_keep = keep_count(self.n_patches, self.keep)
        self.geometry = ViTGeometry.from_model(model, n_patches=self.n_patches, num_prefix=self.num_prefix)

    # ------------------------------------------------------------------ pieces
    def _embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        x = m.patch_embed(pixels)
        if self.is_eva:
            x, rope = m._pos_embed(x)
        else:
            x, rope = m.patch_drop(m._pos_embed(x)), None
        return m.norm_pre(x), rope

    def _block(self, b: int, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        blk = self.model.blocks[b]
        return blk(x, rope=rope) if self.is_eva else blk(x)

    # ------------------------------------------------------------------ forwards
    @torch.inference_mode()
    def full(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every token through every block: ``(B, P + N, d)`` last-block outputs (no final norm)."""
        x, rope = self._embed(pixels)
        for b in range(len(self.model.blocks)):
            x = self._block(b, x, rope)
        return x

    @torch.inference_mode()
    def routed(self, pixels: torch.Tensor) -> RoutedOutput:
        """The routed forward of ``(B, 3, S, S)`` pixels."""
        x, rope = self._embed(pixels)
        for b in range(self.exit_after + 1):
            x = self._block(b, x, rope)
        p = self.num_prefix
        scores = self.router(x[:, p:])
        kept = torch.sort(torch.sort(-scores, dim=1, stable=True).indices[:, :self.n_keep], dim=1).values
        gather = kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        sub = torch.cat([x[:, :p], torch.gather(x[:, p:], 1, gather)], dim=1)
        sub_rope = None
        if rope is not None:
            if rope.dim() != 2:
                raise ValueError(f"expected a (N, dim) rotary embedding, got shape {tuple(rope.shape)}")
            sub_rope = rope[kept].unsqueeze(1)  # (B, 1, K, dim): one embedding per routed patch, shared by heads
        for b in range(self.exit_after + 1, len(self.model.blocks)):
            sub = self._block(b, sub, sub_rope)
        out = x.clone()
        out[:, :p] = sub[:, :p]
        out[:, p:] = out[:, p:].scatter(1, gather, sub[:, p:])
        return RoutedOutput(tokens=out, kept=kept, scores=scores)

    # ------------------------------------------------------------------ cost
    def full_macs(self, batch: int = 1) -> int:
        """Analytic MACs of :meth:`full` on ``batch`` images."""
        return self.geometry.full_macs(batch)

    def routed_macs(self, batch: int = 1) -> int:
        """Analytic MACs of :meth:`routed` on ``batch`` images, router included."""
        return self.geometry.routed_macs(exit_after=self.exit_after, n_keep=self.n_keep,
                                         router_macs_per_token=int(self.router.macs_per_token), batch=batch)


def time_forwards(rd: RoutedDepth, pixels: torch.Tensor, *, repeats: int = 5) -> dict[str, float]:
    """Wall-clock of the full and the routed forward on the same batch, interleaved, after one warm-up each.

    Returns:
        ``{"full_s", "routed_s"}`` medians over ``repeats`` and ``"speedup"`` = full / routed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if pixels.is_cuda else (lambda: None)
    rd.full(pixels), rd.routed(pixels)
    t_full, t_routed = [], []
    for _ in range(repeats):
        for fn, acc in ((rd.full, t_full), (rd.routed, t_routed)):
            sync()
            t0 = time.perf_counter()
            fn(pixels)
            sync()
            acc.append(time.perf_counter() - t0)
    full, routed = statistics.median(t_full), statistics.median(t_routed)
    return {"full_s": full, "routed_s": routed, "speedup": full / routed, "repeats": repeats, "batch": int(pixels.shape[0])}


def lesion_routing(kept: np.ndarray, lesion_tokens: list[list[np.ndarray]], n_patches: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which lesions have at least one token routed through all blocks, against routing at random.

    Args:
        kept: ``(n_images, K)`` routed patch-token indices per image.
        lesion_tokens: per image, one array of flat token indices per lesion (the tokens it touches).
        n_patches: N, patch tokens per image.

    Returns:
        ``(hit, p_random, image)``, each ``(n_lesions,)``: the lesion has a routed token; the probability that
        K tokens drawn uniformly without replacement hit it (``1 - C(N - t, K) / C(N, K)`` for t touched
        tokens); the image index of the lesion.
    """
    kept = np.asarray(kept)
    if kept.ndim != 2 or len(lesion_tokens) != kept.shape[0]:
        raise ValueError(f"kept {kept.shape} and lesion_tokens ({len(lesion_tokens)} images) disagree")
    k = kept.shape[1]
    hit, p_rand, image = [], [], []
    for i, lesions in enumerate(lesion_tokens):
        routed = np.zeros(n_patches, dtype=bool)
        routed[kept[i]] = True
        for toks in lesions:
            t = np.unique(np.asarray(toks, dtype=np.int64))
            if t.size == 0 or t.min() < 0 or t.max() >= n_patches:
                raise ValueError(f"image {i}: lesion token indices {t.tolist()} empty or outside [0, {n_patches})")
            miss = np.prod((n_patches - k - np.arange(t.size)) / (n_patches - np.arange(t.size))) if t.size <= n_patches - k else 0.0
            hit.append(bool(routed[t].any()))
            p_rand.append(1.0 - float(max(miss, 0.0)))
            image.append(i)
    return np.array(hit, dtype=bool), np.array(p_rand), np.array(image, dtype=np.int64)
