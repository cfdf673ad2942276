"""DermaJEPA-style probe heads: a small predictor over L2-normalised frozen embeddings.

A predictor ``g`` maps the embedding of a context image to the embedding of a target image. It is trained
on *stable* pairs only (one image and a nuisance-augmented view of it), so that ``g(z_context)`` lands near
``z_target`` when only the acquisition changed. The change score of a pair is the cosine distance

    score = 1 - cos(g(z_context), z_target)        (higher = more likely a genuinely changing pair)

Two predictors, both the identity at initialisation, so that before training the score equals the raw
cosine distance between the two embeddings:

* ``linear``: ``g(z) = z @ W + b`` with ``W`` (d, d) warm-started at the identity, ``b`` at zero (the
  convention of the published DermaJEPA checkpoints);
* ``mlp``: ``g(z) = z + relu(z @ W1 + b1) @ W2 + b2``, a 2-layer identity-residual MLP with ``W2 = 0``,
  ``b2 = 0`` at initialisation (``W1`` random from the training seed).

Loss: mean cosine distance of the stable pairs plus ``anchor * ||theta - theta_0||^2`` (a pull towards the
identity initialisation, not towards zero). Optimisers: SGD (momentum) or Adam, mini-batches in an order
drawn from the training seed. This module sees embeddings only; it never sees a label or a changing pair.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, Mapping

import numpy as np
import torch

from ..threads import torch_threads

__all__ = ["HeadConfig", "TrainedProbe", "l2_normalise", "predict", "change_score", "cosine_distance", "check_params",
           "train_probe", "init_params", "stable_pair_loss"]

log = logging.getLogger(__name__)

Kind = Literal["linear", "mlp"]
Optimizer = Literal["sgd", "adam"]
_LINEAR_KEYS = ("weight", "bias")
_MLP_KEYS = ("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2")


@dataclass(frozen=True)
class HeadConfig:
    """One probe head of the sweep.

    Attributes:
        kind: ``"linear"`` or ``"mlp"``.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        lr: learning rate.
        epochs: passes over the stable pairs.
        batch_size: pairs per step.
        anchor: weight of the squared distance of the parameters from their initialisation.
        hidden: MLP hidden width (ignored for ``linear``); 0 means ``d``.
    """

    kind: str = "linear"
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 50
    batch_size: int = 64
    anchor: float = 1e-3
    hidden: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"head kind must be 'linear' or 'mlp', got {self.kind!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        for name in ("lr", "anchor"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"{name} must be a finite {'positive' if name == 'lr' else 'non-negative'} number, "
                                 f"got {v!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.hidden < 0:
            raise ValueError(f"epochs >= 0, batch_size >= 1, hidden >= 0 required, got {self}")

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.optimizer}"

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "HeadConfig":
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown head config keys {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainedProbe:
    """A trained predictor and how it was trained.

    Attributes:
        kind: ``"linear"`` or ``"mlp"``.
        params: float32 arrays: ``weight`` (d, d), ``bias`` (d,) for linear; ``mlp_w1`` (d, h), ``mlp_b1`` (h,),
            ``mlp_w2`` (h, d), ``mlp_b2`` (d,) for mlp.
        head: the head config.
        seed: training seed (initialisation and batch order).
        losses: (epochs + 1,) full-data stable-pair loss before training and after every epoch.
        n_pairs: stable pairs trained on.
    """

    kind: str
    params: Mapping[str, np.ndarray]
    head: HeadConfig
    seed: int
    losses: np.ndarray
    n_pairs: int
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.params["bias" if self.kind == "linear" else "mlp_b2"].shape[0])


def l2_normalise(z: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm. Args: z (n, d). Returns: (n, d) float32. Raises on zero rows."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {z.shape}")
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    if not np.all(norms > 0) or not np.isfinite(z).all():
        raise ValueError(f"{int((norms <= 0).sum())} zero or non-finite embedding rows cannot be normalised")
    return (z / norms).astype(np.float32)


def check_params(kind: str, params: Mapping[str, np.ndarray]) -> int:
    keys = _LINEAR_KEYS if kind == "linear" else _MLP_KEYS if kind == "mlp" else None
    if keys is None:
        raise ValueError(f"predictor_kind must be 'linear' or 'mlp', got {kind!r}")
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"{kind} predictor: missing parameters {missing}")
    if kind == "linear":
        w, b = params["weight"], params["bias"]
        if w.ndim != 2 or w.shape[0] != w.shape[1] or b.shape != (w.shape[1],):
            raise ValueError(f"linear predictor: weight {w.shape} must be (d, d) and bias {b.shape} (d,)")
        return int(w.shape[0])
    w1, b1, w2, b2 = (params[k] for k in _MLP_KEYS)
    d, h = w1.shape
    if b1.shape != (h,) or w2.shape != (h, d) or b2.shape != (d,):
        raise ValueError(f"mlp predictor: shapes w1 {w1.shape}, b1 {b1.shape}, w2 {w2.shape}, b2 {b2.shape} "
                         "must be (d, h), (h,), (h, d), (d,)")
    return int(d)


def _forward(kind: str, p: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return z @ p["weight"] + p["bias"]
    return z + torch.relu(z @ p["mlp_w1"] + p["mlp_b1"]) @ p["mlp_w2"] + p["mlp_b2"]


def predict(kind: str, params: Mapping[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    """Apply a predictor.

    Args:
        kind: ``"linear"`` or ``"mlp"``.
        params: see :class:`TrainedProbe`.
        z: (n, d) L2-normalised context embeddings.

    Returns:
        (n, d) float32 predictions (not normalised).
    """
    d = check_params(kind, params)
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != d:
        raise ValueError(f"embeddings of shape {z.shape} do not fit a predictor of dimension {d}")
    with torch.no_grad():
        out = _forward(kind, {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in params.items()},
                       torch.as_tensor(z))
    return out.numpy()


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``1 - cos(a_i, b_i)``, in [0, 2]. Args: a, b (n, d). Returns: (n,) float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cosine_distance needs two (n, d) arrays of one shape, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if not (np.all(na > 0) and np.all(nb > 0)):
        raise ValueError("cosine distance of a zero vector is undefined")
    return 1.0 - np.clip(np.einsum("nd,nd->n", a, b) / (na * nb), -1.0, 1.0)


def change_score(kind: str, params: Mapping[str, np.ndarray], z_context: np.ndarray,
                 z_target: np.ndarray) -> np.ndarray:
    """``1 - cos(g(z_context), z_target)`` per pair. Args: (n, d) each. Returns: (n,) float64."""
    return cosine_distance(predict(kind, params, z_context), z_target)


def init_params(kind: str, d: int, *, hidden: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Identity initialisation: ``W = I, b = 0`` (linear) or ``W2 = 0, b2 = 0`` (mlp; ``W1`` seeded).

    Returns:
        float32 parameter arrays (see :class:`TrainedProbe`).
    """
    if d < 1:
        raise ValueError(f"feature dimension must be >= 1, got {d}")
    if kind == "linear":
        return {"weight": np.eye(d, dtype=np.float32), "bias": np.zeros(d, dtype=np.float32)}
    if kind != "mlp":
        raise ValueError(f"predictor kind must be 'linear' or 'mlp', got {kind!r}")
    h = hidden or d
    g = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / np.sqrt(d)
    w1 = (torch.rand((d, h), generator=g, dtype=torch.float32) * 2 - 1) * bound
    return {"mlp_w1": w1.numpy(), "mlp_b1": np.zeros(h, dtype=np.float32),
            "mlp_w2": np.zeros((h, d), dtype=np.float32), "mlp_b2": np.zeros(d, dtype=np.float32)}


def stable_pair_loss(kind: str, params: Mapping[str, np.ndarray], z_context: np.ndarray,
                     z_target: np.ndarray) -> float:
    """Mean cosine distance of stable pairs (the data term of the training loss)."""
    return float(change_score(kind, params, z_context, z_target).mean())


def _loss(kind: str, p: Mapping[str, torch.Tensor], p0: Mapping[str, torch.Tensor], zc: torch.Tensor,
          zt: torch.Tensor, anchor: float) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _forward(kind, p, zc)
    data = (1.0 - torch.nn.functional.cosine_similarity(pred, zt, dim=1, eps=1e-12)).mean()
    reg = sum(((p[k] - p0[k]) ** 2).sum() for k in p)
    return data + anchor * reg, data


def train_probe(z_context: np.ndarray, z_target: np.ndarray, head: HeadConfig, *, seed: int) -> TrainedProbe:
    """Train one predictor on stable pairs.

    Args:
        z_context: (n, d) L2-normalised embeddings of the context images.
        z_target: (n, d) L2-normalised embeddings of their nuisance views (same row order).
        head: predictor, optimiser and schedule.
        seed: initialisation (mlp ``W1``) and mini-batch order.

    Returns:
        :class:`TrainedProbe` with float32 parameters and the loss curve.
    """
    zc_np, zt_np = np.asarray(z_context, dtype=np.float32), np.asarray(z_target, dtype=np.float32)
    if zc_np.ndim != 2 or zc_np.shape != zt_np.shape or zc_np.shape[0] < 1:
        raise ValueError(f"stable pairs need two (n, d) arrays of one shape, got {zc_np.shape} and {zt_np.shape}")
    for name, arr in (("z_context", zc_np), ("z_target", zt_np)):
        norms = np.linalg.norm(arr, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-4):
            raise ValueError(f"{name} must be L2-normalised (row norms in [{norms.min():.4f}, {norms.max():.4f}])")
    # the predictor is tiny (d x d): intra-op parallelism only adds overhead, and on busy cores a great deal
    with torch_threads(1):
        return _train(zc_np, zt_np, head, int(seed))


def _train(zc_np: np.ndarray, zt_np: np.ndarray, head: HeadConfig, seed: int) -> TrainedProbe:
    n, d = zc_np.shape
    init = init_params(head.kind, d, hidden=head.hidden, seed=seed)
    p0 = {k: torch.as_tensor(v) for k, v in init.items()}
    p = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    zc, zt = torch.as_tensor(zc_np), torch.as_tensor(zt_np)
    opt: torch.optim.Optimizer = (torch.optim.SGD(list(p.values()), lr=head.lr, momentum=0.9)
                                  if head.optimizer == "sgd" else torch.optim.Adam(list(p.values()), lr=head.lr))
    g = torch.Generator().manual_seed(int(seed) + 1)
    losses = np.empty(head.epochs + 1)
    with torch.no_grad():
        losses[0] = float(_loss(head.kind, p, p0, zc, zt, 0.0)[1])
    from ..progress import progress

    with progress(f"probe {head.name} seed {seed}", head.epochs, unit="epochs") as advance:
        for epoch in range(head.epochs):
            order = torch.randperm(n, generator=g)
            for start in range(0, n, head.batch_size):
                idx = order[start:start + head.batch_size]
                loss, _ = _loss(head.kind, p, p0, zc[idx], zt[idx], head.anchor)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                losses[epoch + 1] = float(_loss(head.kind, p, p0, zc, zt, 0.0)[1])
            advance()
    if not np.isfinite(losses).all():
        raise FloatingPointError(f"{head.name} (seed {seed}): the stable-pair loss diverged: {losses[-3:]}")
    params = {k: v.detach().numpy().astype(np.float32) for k, v in p.items()}
    log.debug("trained %s seed %d on %d pairs: loss %.5f -> %.5f", head.name, seed, n, losses[0], losses[-1])
    return TrainedProbe(head.kind, params, head, int(seed), losses, int(n))
