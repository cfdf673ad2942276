"""A coverage-constrained token pruner: hard-concrete gates trained per image under a Lagrangian constraint.

For each image with tokens ``Z`` (``N x d``) the pruner learns gate locations ``log_alpha`` (one per token) for

    minimise   E[kept fraction] = mean_j P(z_j != 0)
    subject to F(Z, z) >= c * F(Z)

where ``F`` is a coverage functional (:mod:`covtoken.coverage`; token ``j`` enters with weight ``z_j``) and ``c``
the target. The constraint is handled with the Lagrangian ``E[kept] + lambda (c - F(Z, z) / F(Z))``: Adam
steps on ``log_alpha`` (rate ``lr``) with one sampled gate vector per step, and projected dual ascent
``lambda <- max(0, lambda + dual_lr (c - F / F_all))`` (``dual_lr >> lr``), one ``lambda`` per image. A batch of
images is trained at once, but images share nothing.

At test time the gates are deterministic (:func:`~covtoken.gate.hard_concrete.deterministic_gates`); a token
is kept when its gate is above 0, and ``F`` is evaluated on the kept subset. If the deterministic keep set
misses the constraint, dropped tokens are added back in order of decreasing ``log_alpha`` until it holds
(``repaired`` counts them), so every returned keep set satisfies ``F(kept) >= c F(all)``.
Nothing here sees a mask.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..coverage import get_functional
from ..threads import torch_threads
from .hard_concrete import deterministic_gates, gate_entropy, prob_nonzero, sample_gates

__all__ = ["PrunerConfig", "PrunerResult", "fit_pruner"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrunerConfig:
    """Settings of :func:`fit_pruner` (locked per gate entry).

    Attributes:
        functional: coverage functional of the constraint (``coding_rate``, ``rankme``, ``energy``).
        eps: its epsilon (coding rate: the formula's eps; RankMe: the added constant); None for energy.
        target: ``c`` in ``F(kept) >= c F(all)``; the slack of the constraint is ``1 - c``.
        steps: optimisation steps.
        lr: Adam step size on ``log_alpha``.
        dual_lr: dual ascent step on ``lambda``.
        init_log_alpha: initial gate location (3.0: almost every gate open).
        seed: seed of the gate noise.
        log_every: steps between history entries.
        batch_size: images trained together (memory: about ``batch_size * min(N, d)^2`` floats).
    """

    functional: str = "coding_rate"
    eps: float | None = 0.5
    target: float = 0.95
    steps: int = 300
    lr: float = 0.05
    dual_lr: float = 2.0
    init_log_alpha: float = 3.0
    seed: int = 0
    log_every: int = 50
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target c must lie in (0, 1], got {self.target!r}")
        if self.steps < 1 or self.lr <= 0 or self.dual_lr <= 0:
            raise ValueError(f"need steps >= 1, lr > 0, dual_lr > 0; got {self.steps}, {self.lr}, {self.dual_lr}")


@dataclass
class PrunerResult:
    """Output of :func:`fit_pruner` for ``B`` images of ``N`` tokens.

    Attributes:
        kept: ``(B, N)`` bool test-time keep sets (after repair).
        gates: ``(B, N)`` deterministic gate values before repair.
        log_alpha: ``(B, N)`` learnt gate locations.
        ratio: ``(B,)`` ``F(kept) / F(all)`` of the returned keep sets.
        lam: ``(B,)`` final dual variables.
        repaired: ``(B,)`` tokens added back to meet the constraint at test time.
        history: logged ``{step, lambda_mean, slack_mean, expected_keep, gate_entropy}`` entries (batch means).
    """

    kept: np.ndarray
    gates: np.ndarray
    log_alpha: np.ndarray
    ratio: np.ndarray
    lam: np.ndarray
    repaired: np.ndarray
    history: list[dict] = field(default_factory=list)

    @property
    def keep_fraction(self) -> np.ndarray:
        """``(B,)`` fraction of tokens kept per image."""
        return self.kept.mean(axis=1)


def _functional(cfg: PrunerConfig):  # noqa: ANN202 (a bound callable)
    params = {} if cfg.eps is None else {"eps": float(cfg.eps)}
    return get_functional(cfg.functional, **params)


def _ratio(fn, z: torch.Tensor, w: torch.Tensor, full: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """``F(z, w) / F(all)`` per image; an image whose gates are all 0 scores 0 (the empty set covers nothing)."""
    alive = w.sum(-1) > 0
    out = torch.zeros_like(full)
    if bool(alive.any()):
        out = out.index_put((alive.nonzero().squeeze(-1),), fn(z[alive], w[alive]) / full[alive])
    return out


def _repair(fn, z: torch.Tensor, kept: torch.Tensor, log_alpha: torch.Tensor, full: torch.Tensor,  # noqa: ANN001
            target: float, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Add dropped tokens (highest ``log_alpha`` first) until ``F(kept) >= target F(all)``; returns (kept, added)."""
    kept = kept.clone()
    added = torch.zeros(kept.shape[0], dtype=torch.long, device=kept.device)
    ratio = _ratio(fn, z, kept.to(z.dtype), full)
    for i in torch.nonzero(ratio < target).squeeze(-1).tolist():
        before = int(kept[i].sum())
        order = torch.argsort(torch.where(kept[i], torch.full_like(log_alpha[i], -torch.inf), log_alpha[i]),
                              descending=True, stable=True)[: int((~kept[i]).sum())]
        for start in range(0, order.numel(), chunk):
            cand = order[start:start + chunk]
            masks = kept[i].repeat(cand.numel(), 1)
            for r in range(cand.numel()):
                masks[r:, cand[r]] = True  # row r adds the first r + 1 candidates of this chunk
            r_i = fn(z[i].expand(cand.numel(), -1, -1), masks.to(z.dtype)) / full[i]
            ok = torch.nonzero(r_i >= target).squeeze(-1)
            if ok.numel():
                kept[i] = masks[int(ok[0])]
                break
            kept[i] = masks[-1]
        added[i] = int(kept[i].sum()) - before
    return kept, added


def fit_pruner(tokens: np.ndarray, cfg: PrunerConfig, *, device: str = "cpu", cpu_threads: int = 1) -> PrunerResult:
    """Train the gates of every image and return its test-time keep set.

    Args:
        tokens: ``(B, N, d)`` patch tokens of ``B`` images.
        cfg: pruner settings.
        device: where the gates are trained (``"cuda"`` for real backbones: one ``min(N, d)``-sized
            log-determinant per image and step).
        cpu_threads: intra-op threads while training on CPU.

    Returns:
        :class:`PrunerResult` (numpy arrays on the host).
    """
    arr = np.asarray(tokens)
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise ValueError(f"tokens must be (B, N, d) with B, N, d > 0, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("tokens contain NaN or Inf")
    dev = torch.device(device)
    # batches of small matrices gain nothing from more intra-op threads, and on a shared machine extra threads
    # only spin
    with torch_threads(cpu_threads if dev.type == "cpu" else 0):
        parts = [_fit_batch(arr[s:s + cfg.batch_size], cfg, offset=s, device=dev)
                 for s in range(0, arr.shape[0], cfg.batch_size)]
    hist = parts[0].history if len(parts) == 1 else [
        {k: (float(np.mean([p.history[i][k] for p in parts])) if k != "step" else parts[0].history[i][k])
         for k in parts[0].history[i]} for i in range(len(parts[0].history))]
    return PrunerResult(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in
                           ("kept", "gates", "log_alpha", "ratio", "lam", "repaired")}, history=hist)


def _fit_batch(tokens: np.ndarray, cfg: PrunerConfig, *, offset: int, device: torch.device) -> PrunerResult:
    fn = _functional(cfg)
    z = torch.from_numpy(tokens.astype(np.float64)).to(device)
    b, n, _ = z.shape
    with torch.no_grad():
        full = fn(z, None)
    if not bool((full > 0).all()):
        raise ValueError(f"{cfg.functional} of the full token set must be positive, got min {float(full.min())}")
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed) * 1_000_003 + offset)
    log_alpha = torch.full((b, n), float(cfg.init_log_alpha), dtype=torch.float64, device=device, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=cfg.lr)
    lam = torch.zeros(b, dtype=torch.float64, device=device)
    history = []
    from ..progress import progress

    with progress(f"pruner, images {offset}..{offset + b - 1}", cfg.steps, unit="steps") as advance:
        for step in range(1, cfg.steps + 1):
            gates = sample_gates(log_alpha, generator=gen)
            ratio = _ratio(fn, z, gates, full)
            violation = cfg.target - ratio
            expected_keep = prob_nonzero(log_alpha).mean(-1)
            loss = (expected_keep + lam * violation).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                lam = (lam + cfg.dual_lr * violation.detach()).clamp_min(0.0)
            if step % cfg.log_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    history.append({"step": step, "lambda_mean": float(lam.mean()), "slack_mean": float(-violation.mean()),
                                    "expected_keep": float(expected_keep.mean()),
                                    "gate_entropy": float(gate_entropy(log_alpha))})
            advance()
    with torch.no_grad():
        la = log_alpha.detach()
        gates = deterministic_gates(la)
        kept = gates > 0
        kept, added = _repair(fn, z, kept, la, full, cfg.target)
        ratio = _ratio(fn, z, kept.to(z.dtype), full)
    log.debug("pruner batch at %d: keep %.3f, repaired %d images", offset, float(kept.double().mean()),
              int((added > 0).sum()))
    return PrunerResult(kept=kept.cpu().numpy(), gates=gates.cpu().numpy(), log_alpha=la.cpu().numpy(),
                        ratio=ratio.cpu().numpy(), lam=lam.cpu().numpy(), repaired=added.cpu().numpy(), history=history)
