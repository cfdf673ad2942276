"""Rank helpers shared by :mod:`covtoken.eval.bootstrap` and :mod:`covtoken.eval.delong`.

Three pieces, all pure functions or small immutable-after-construction classes:

* input validation for labels and scores (``ValueError`` names the bad value);
* :func:`class_midranks`: the mid-ranks fast DeLong needs (over all samples, within positives, within
  negatives), equal to ``scipy.stats.rankdata(method="average")``, from one sort and O(n) counting;
* :class:`WeightedAUROC` and :class:`WeightedSpearman`: exact statistics of *weighted* samples, batched
  over many weight vectors. A cluster bootstrap resample that draws patient ``k`` ``c_k`` times is the same
  sample as every token of patient ``k`` repeated ``c_k`` times, so its AUROC is the weighted Mann-Whitney
  count with token weight ``c_{cluster(token)}``: ties count ½, exactly as ``roc_auc_score`` on the
  materialised resample. All counts are integers or halves, so float64 sums are exact (below 2**52).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

DEFAULT_MAX_BYTES = 128 * 2**20  # chunk working memory; with sorting and the sparse matrices, ~200 MB in all


def as_binary_labels(y: np.ndarray, *, n: int | None = None, name: str = "y") -> np.ndarray:
    """Validate 0/1 labels and return them as a boolean mask.

    Args:
        y: (n,) labels, bool or numeric with values in {0, 1}.
        n: expected length, or None to accept any.
        name: argument name used in error messages.

    Returns:
        (n,) bool array, True for positives.

    Raises:
        ValueError: wrong shape or length, non-binary values, no positives or no negatives.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"length mismatch: {name} has {arr.shape[0]} entries, expected {n}")
    if arr.dtype == bool:
        lab = arr
    elif np.issubdtype(arr.dtype, np.number):
        bad = (arr != 0) & (arr != 1)
        if bad.any():
            raise ValueError(f"{name} must be binary 0/1, found value(s) {np.unique(arr[bad])[:5].tolist()}")
        lab = arr == 1
    else:
        raise ValueError(f"{name} must be bool or numeric 0/1, got dtype {arr.dtype}")
    n_pos = int(lab.sum())
    if n_pos == 0:
        raise ValueError(f"{name} has no positives (all {lab.size} labels are 0); AUROC is undefined")
    if n_pos == lab.size:
        raise ValueError(f"{name} has no negatives (all {lab.size} labels are 1); AUROC is undefined")
    return lab


def as_finite_scores(score: np.ndarray, n: int, name: str = "score") -> np.ndarray:
    """Validate one score vector.

    Args:
        score: (n,) real scores.
        n: expected length.
        name: argument name used in error messages.

    Returns:
        (n,) float64 array.

    Raises:
        ValueError: wrong shape or length, non-numeric dtype, NaN or infinite entries.
    """
    arr = np.asarray(score)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"length mismatch: {name} has {arr.shape[0]} entries, expected {n}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name} has {int((~finite).sum())} non-finite value(s), first {arr[i]!r} at index {i}")
    return arr


def class_midranks(score: np.ndarray, is_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mid-ranks over all samples and within each class (the T_z, T_x, T_y of Sun & Xu 2014).

    All three equal ``scipy.stats.rankdata(..., method="average")`` of ``score``, ``score[is_pos]`` and
    ``score[~is_pos]`` exactly (the tests check this). They come from a single unstable ``np.argsort``
    (numpy's SIMD quicksort; mid-ranks average over ties, so the order inside a tie group is irrelevant)
    and O(n) per-tie-group counting: with s_g samples below a group of size g holding p_g positives, of
    which P_g positives lie below, ``T_z = s_g + (g + 1)/2``, ``T_x = P_g + (p_g + 1)/2`` and
    ``T_y = (s_g - P_g) + (g - p_g + 1)/2``. rankdata's stable sort would cost about 4 times as much.

    Args:
        score: (n,) finite float scores.
        is_pos: (n,) bool, True for positives.

    Returns:
        t_z: (n,) mid-ranks among all samples (1-based);
        t_x: (m,) mid-ranks of the positives among positives, in the order of ``score[is_pos]``;
        t_y: (n - m,) mid-ranks of the negatives among negatives, in the order of ``score[~is_pos]``.
    """
    n = score.size
    order = np.argsort(score)
    ordered = score.take(order)
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    sizes = np.diff(starts, append=n)
    pos_in = np.add.reduceat(is_pos.take(order).astype(np.intp), starts)
    pos_below = np.cumsum(pos_in) - pos_in
    group = np.empty(n, dtype=np.intp)
    group[order] = np.cumsum(new_group) - 1  # tie group of every sample, in input order
    t_z = (starts + 0.5 * (sizes + 1)).take(group)
    pos, neg = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)  # index arrays: faster than boolean masks
    t_x = (pos_below + 0.5 * (pos_in + 1)).take(group.take(pos))
    t_y = ((starts - pos_below) + 0.5 * (sizes - pos_in + 1)).take(group.take(neg))
    return t_z, t_x, t_y


def _dense_groups(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Tie-group index (0 = smallest value) of each entry, and the number of groups."""
    _, inv = np.unique(values, return_inverse=True)
    inv = inv.ravel()
    return inv, int(inv.max()) + 1


def _count_matrix(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """(rows, cols) sparse matrix counting the (row, col) pairs, duplicates summed."""
    mat = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=shape)
    mat.sum_duplicates()
    return mat


class WeightedAUROC:
    """Exact AUROC of one score arm under many cluster-weight vectors.

    Sorting and tie grouping happen once, here. Consecutive tie groups holding only negatives (or only
    positives) are merged into blocks, since the count for a positive depends only on the negative weight
    below it; a tie group holding both classes is its own block. With N (blocks x clusters) the negative
    token counts and P the positive ones, a weight vector x (clusters,) gives the Mann-Whitney numerator
    ``x . P^T (L N x)``, L = strictly-lower cumulative sum + ½ identity (ties count ½), and the AUROC is
    that divided by (p . x)(q . x), the weighted positive and negative totals.

    Args:
        is_pos: (n,) bool labels.
        score: (n,) finite scores.
        cluster_idx: (n,) int cluster index of each token in [0, n_clusters).
        n_clusters: number of clusters K.
    """

    def __init__(self, is_pos: np.ndarray, score: np.ndarray, cluster_idx: np.ndarray, n_clusters: int) -> None:
        groups, _ = _dense_groups(score)
        n_groups = int(groups.max()) + 1
        has_pos = np.bincount(groups[is_pos], minlength=n_groups) > 0
        has_neg = np.bincount(groups[~is_pos], minlength=n_groups) > 0
        kind = has_pos.astype(np.int8) + 2 * has_neg.astype(np.int8)  # 1 pos only, 2 neg only, 3 both
        new_block = np.ones(n_groups, dtype=bool)
        new_block[1:] = (kind[1:] != kind[:-1]) | (kind[1:] == 3)
        block = (np.cumsum(new_block) - 1)[groups]
        self.n_blocks = int(block.max()) + 1
        self.n_clusters = int(n_clusters)
        shape = (self.n_blocks, self.n_clusters)
        self._neg = _count_matrix(block[~is_pos], cluster_idx[~is_pos], shape)
        self._pos_t = _count_matrix(block[is_pos], cluster_idx[is_pos], shape).T.tocsr()
        self._pos_per_cluster = np.bincount(cluster_idx[is_pos], minlength=n_clusters).astype(np.int64)
        self._neg_per_cluster = np.bincount(cluster_idx[~is_pos], minlength=n_clusters).astype(np.int64)

    def _half_counts(self, x: np.ndarray) -> np.ndarray:
        """P^T L N x for weight columns x (K, c) -> (K, c): per cluster, weighted negatives below its positives."""
        nx = self._neg @ x
        cum = np.cumsum(nx, axis=0)
        nx *= 0.5
        cum -= nx  # inclusive cumsum - ½ own = negatives strictly below + ½ tied
        del nx
        return self._pos_t @ cum

    def _column_cost(self) -> int:
        return self._neg.nnz + self._pos_t.nnz + 4 * self.n_blocks + self.n_clusters

    def auroc(self, counts: np.ndarray, *, route: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
        """AUROC for each weight vector.

        Args:
            counts: (B, K) non-negative integer weights per cluster (bootstrap draw counts).
            route: "direct" (one kernel pass per weight vector), "bilinear" (build the K x K matrix
                P^T L N once, then one dense matmul; cheaper when K is small against B), or "auto".
            max_bytes: working-memory target for one chunk.

        Returns:
            (B,) float64 AUROCs; NaN where a weight vector leaves no positive or no negative token.
        """
        counts = np.asarray(counts)
        b, k = counts.shape
        if k != self.n_clusters:
            raise ValueError(f"counts has {k} clusters, expected {self.n_clusters}")
        if route == "auto":
            direct_cost = b * self._column_cost()
            bilinear_cost = k * self._column_cost() + b * k * k // 16  # dense BLAS is far cheaper per flop
            fits = 8 * k * k <= max_bytes // 4
            route = "bilinear" if fits and bilinear_cost < direct_cost else "direct"
        if route not in ("direct", "bilinear"):
            raise ValueError(f"route must be 'auto', 'direct' or 'bilinear', got {route!r}")
        num = np.empty(b)
        if route == "bilinear":
            per_col = 8 * (2 * self.n_blocks + 3 * k)
            step = max(1, max_bytes // per_col)
            mat = np.empty((k, k))
            for a in range(0, k, step):
                cols = np.arange(a, min(a + step, k))
                unit = np.zeros((k, cols.size))
                unit[cols, np.arange(cols.size)] = 1.0  # identity columns a .. a + step
                mat[:, cols] = self._half_counts(unit)
            step = max(1, max_bytes // (8 * 3 * k))
            for a in range(0, b, step):
                xb = counts[a:a + step].astype(np.float64)
                num[a:a + step] = np.einsum("bk,bk->b", xb @ mat.T, xb)
        else:
            step = max(1, max_bytes // (8 * (2 * self.n_blocks + 3 * k)))
            for a in range(0, b, step):
                x = np.ascontiguousarray(counts[a:a + step].T, dtype=np.float64)
                num[a:a + step] = np.einsum("kc,kc->c", x, self._half_counts(x))
        denom = (counts @ self._pos_per_cluster).astype(np.float64) * (counts @ self._neg_per_cluster)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), np.nan)


class WeightedSpearman:
    """Exact Spearman correlation of a pair of variables under many cluster-weight vectors.

    A weight vector repeats each token as often as its cluster was drawn; the resample's Spearman rho is
    the Pearson correlation of its mid-ranks. Per tie group of x (and of y) the weighted mid-rank is the
    weight below plus (group weight + 1)/2; centring on the mean rank (W + 1)/2 keeps the sums small.

    Args:
        x: (n,) finite values.
        y: (n,) finite values.
        cluster_idx: (n,) int cluster index in [0, n_clusters).
        n_clusters: number of clusters K.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, cluster_idx: np.ndarray, n_clusters: int) -> None:
        gx, n_gx = _dense_groups(x)
        gy, n_gy = _dense_groups(y)
        pair_key, pair = np.unique(gx.astype(np.int64) * n_gy + gy, return_inverse=True)
        self.n_clusters = int(n_clusters)
        self._gx = _count_matrix(gx, cluster_idx, (n_gx, n_clusters))
        self._gy = _count_matrix(gy, cluster_idx, (n_gy, n_clusters))
        self._pairs = _count_matrix(pair.ravel(), cluster_idx, (pair_key.size, n_clusters))
        self._pair_x = pair_key // n_gy
        self._pair_y = pair_key % n_gy
        self._size = np.bincount(cluster_idx, minlength=n_clusters).astype(np.float64)

    @staticmethod
    def _centred_ranks(w: np.ndarray, total: np.ndarray) -> np.ndarray:
        # mid-rank = weight below + (w + 1)/2 = cumsum - w/2 + 1/2; minus the mean rank (total + 1)/2
        return np.cumsum(w, axis=0) - 0.5 * w - 0.5 * total

    def rho(self, counts: np.ndarray, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
        """Spearman rho for each weight vector.

        Args:
            counts: (B, K) non-negative integer weights per cluster.
            max_bytes: working-memory target for one chunk.

        Returns:
            (B,) float64; NaN where a resample has constant x or constant y.
        """
        counts = np.asarray(counts)
        b, k = counts.shape
        if k != self.n_clusters:
            raise ValueError(f"counts has {k} clusters, expected {self.n_clusters}")
        rows = self._gx.shape[0] + self._gy.shape[0] + 3 * self._pairs.shape[0] + k
        step = max(1, max_bytes // (8 * 2 * rows))
        out = np.empty(b)
        for a in range(0, b, step):
            w = np.ascontiguousarray(counts[a:a + step].T, dtype=np.float64)
            total = self._size @ w
            wx, wy = self._gx @ w, self._gy @ w
            rx, ry = self._centred_ranks(wx, total), self._centred_ranks(wy, total)
            sxx = np.einsum("gc,gc->c", wx, rx * rx)
            syy = np.einsum("gc,gc->c", wy, ry * ry)
            sxy = np.einsum("pc,pc->c", self._pairs @ w, rx[self._pair_x] * ry[self._pair_y])
            with np.errstate(invalid="ignore", divide="ignore"):
                out[a:a + step] = sxy / np.sqrt(sxx * syy)
        return out
