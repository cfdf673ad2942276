"""Frozen-feature evaluation of a self-supervised encoder, with patients as clusters everywhere.

Pure functions over embeddings (no I/O, no model): a linear probe (sklearn ``LogisticRegression``, ``C`` chosen
on validation patients), kNN few-shot episodes (1/5/10 shots per class, support images from distinct training
patients), a data-efficiency curve (linear probe on 1 % / 10 % / 100 % of the training labels), a segmentation
probe (a linear classifier on patch tokens -> foreground Dice per patient; background is never averaged in),
and a patient-clustered paired bootstrap for the gains of one feature set over another.

Labels are opened here (``covtoken.eval``), never upstream: :func:`image_labels` reads the sealed masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from ..data.layout import EvalMasks, unseal
from .bootstrap import draw_cluster_counts, encode_clusters, percentile_ci

__all__ = ["image_labels", "pixel_masks", "LinearProbe", "linear_probe", "probe_decisions", "select_probe",
           "fraction_rows", "knn_episodes", "balanced_accuracy_ci",
           "data_efficiency", "segmentation_probe", "segmentation_decisions", "select_segmentation",
           "paint_decisions", "dice_per_patient", "mean_ci", "DEFAULT_CS"]

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)


def image_labels(masks: EvalMasks, image_ids: Sequence[str]) -> np.ndarray:
    """``1`` when the image's mask has any lesion pixel, else ``0`` (``(n,)`` int8)."""
    return np.array([bool(unseal(masks[i]).any()) for i in image_ids], dtype=np.int8)


def volume_labels(masks: EvalMasks, slices_of: Mapping[str, Sequence[str]], volume_ids: Sequence[str]) -> np.ndarray:
    """``1`` when any slice of the volume holds a lesion pixel, else ``0`` (``(n_volumes,)`` int8)."""
    return np.array([int(image_labels(masks, slices_of[v]).max()) for v in volume_ids], dtype=np.int8)


def pixel_masks(masks: EvalMasks, image_ids: Sequence[str]) -> list[np.ndarray]:
    """The boolean masks of ``image_ids`` (evaluation only)."""
    return [np.asarray(unseal(masks[i]), dtype=bool) for i in image_ids]


@dataclass(frozen=True)
class LinearProbe:
    """A linear probe chosen on validation: ``C``, its validation AUROC per candidate, and test scores."""

    chosen_c: float
    val_auroc: dict[float, float]
    test_scores: np.ndarray


def _fit_logreg(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
    return scaler, clf


def probe_decisions(train_x: np.ndarray, train_y: np.ndarray, eval_x: Sequence[np.ndarray], *,
                    cs: Sequence[float] = DEFAULT_CS, seed: int = 0) -> tuple[list[float], list[np.ndarray]]:
    """The *fit* role of the linear probe: one logistic regression per ``C`` on standardised training features.

    Only training labels are read. Returns the sorted ``C`` grid and, per array in ``eval_x``, the decision values
    ``(len(cs), n)``: what :func:`select_probe` needs to choose ``C`` on validation and to score test images, so a
    recomputation never refits (an optimiser's last bits depend on the machine's BLAS; stored decisions do not).
    """
    if len(set(np.asarray(train_y).tolist())) < 2:
        raise ValueError("linear probe needs both classes among training images")
    grid = sorted(float(c) for c in cs)
    out = [np.empty((len(grid), len(x)), dtype=np.float64) for x in eval_x]
    for k, c in enumerate(grid):
        scaler, clf = _fit_logreg(train_x, train_y, c, seed)
        for o, x in zip(out, eval_x):
            o[k] = clf.decision_function(scaler.transform(x))
    return grid, out


def select_probe(cs: Sequence[float], val_decisions: np.ndarray, val_y: np.ndarray,
                 test_decisions: np.ndarray) -> LinearProbe:
    """The *select* role: ``C`` with the best validation AUROC (ties: smallest C); its test decisions."""
    if len(set(np.asarray(val_y).tolist())) < 2:
        raise ValueError("linear probe needs both classes among validation images")
    table = {float(c): float(roc_auc_score(val_y, d)) for c, d in zip(cs, val_decisions)}
    best = max(table, key=lambda c: (table[c], -c))
    return LinearProbe(best, table, np.asarray(test_decisions[list(table).index(best)]))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 test_x: np.ndarray, *, cs: Sequence[float] = DEFAULT_CS, seed: int = 0) -> LinearProbe:
    """Logistic regression on standardised features; ``C`` with the best validation AUROC (ties: smallest C).

    Args:
        train_x, train_y: ``(n, d)`` features and 0/1 labels of training patients' images (both classes needed).
        val_x, val_y: validation patients' images (both classes needed).
        test_x: test patients' images.

    Returns:
        :class:`LinearProbe` with ``test_scores`` = decision function on ``test_x``.
    """
    if len(set(np.asarray(train_y).tolist())) < 2 or len(set(np.asarray(val_y).tolist())) < 2:
        raise ValueError("linear probe needs both classes among training and validation images")
    grid, (val_dec, test_dec) = probe_decisions(train_x, train_y, [val_x, test_x], cs=cs, seed=seed)
    return select_probe(grid, val_dec, val_y, test_dec)


def knn_episodes(train_x: np.ndarray, train_y: np.ndarray, train_patients: np.ndarray, query_x: np.ndarray, *,
                 shots: int, n_episodes: int, seed: int) -> np.ndarray:
    """Few-shot kNN: per episode, ``shots`` support images per class from distinct training patients
    (as many as there are), a cosine kNN (``n_neighbors = shots``, distance-weighted) labels every query.

    Returns:
        ``(n_episodes, n_query)`` predicted labels (0/1). The same seed draws the same supports for every
        feature set, so episodes are paired across backbones.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(train_y)
    pats = np.asarray(train_patients)
    out = np.empty((n_episodes, len(query_x)), dtype=np.int8)
    for e in range(n_episodes):
        support = []
        for cls in (0, 1):
            members = np.flatnonzero(y == cls)
            if members.size < shots:
                raise ValueError(f"{shots}-shot episodes need {shots} training images of class {cls}, "
                                 f"have {members.size}")
            by_patient: dict = {}
            for i in rng.permutation(members):
                by_patient.setdefault(pats[i], []).append(i)
            order = rng.permutation(len(by_patient))
            heads = [by_patient[list(by_patient)[j]][0] for j in order]
            rest = [i for j in order for i in by_patient[list(by_patient)[j]][1:]]
            support.extend((heads + rest)[:shots])
        knn = KNeighborsClassifier(n_neighbors=shots, metric="cosine", weights="distance")
        knn.fit(train_x[support], y[support])
        out[e] = knn.predict(query_x)
    return out


def _balanced(weights: np.ndarray, correct: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Balanced accuracy per row of per-image ``weights`` (``(B, n)``), NaN where a class has no weight."""
    accs = []
    for cls in (0, 1):
        m = y == cls
        w = weights[:, m]
        tot = w.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accs.append(np.where(tot > 0, (w @ correct[m]) / np.where(tot > 0, tot, 1), np.nan))
    return (accs[0] + accs[1]) / 2


def balanced_accuracy_ci(predictions: Sequence[np.ndarray], y: np.ndarray, clusters: np.ndarray, *, n_boot: int,
                         ci_level: float, seed: int) -> dict:
    """Balanced accuracy of each arm's episode predictions (mean over episodes) with a patient-clustered,
    paired percentile bootstrap; the first two arms also get the CI of their difference.

    Args:
        predictions: per arm, ``(n_episodes, n)`` predicted labels of the query images.
        y: ``(n,)`` true labels; clusters: ``(n,)`` patient ids.

    Returns:
        ``{"value": [...], "ci": [...], "diff", "diff_ci", "n_undefined", "n_clusters", "method"}``.
    """
    y = np.asarray(y)
    ids, idx = encode_clusters(np.asarray(clusters), y.size)
    k = ids.size
    has_neg = np.bincount(idx[y == 0], minlength=k) > 0
    counts = draw_cluster_counts([s for s in (np.flatnonzero(has_neg), np.flatnonzero(~has_neg)) if s.size], k,
                                 int(n_boot), int(seed))
    weights = counts[:, idx].astype(np.float64)
    point, samples = [], []
    for pred in predictions:
        correct = (np.asarray(pred) == y[None]).mean(0)  # per image: fraction of episodes right
        point.append(float(_balanced(np.ones((1, y.size)), correct, y)[0]))
        samples.append(_balanced(weights, correct, y))
    s = np.column_stack(samples)
    ok = ~np.isnan(s).any(1)
    bounds = percentile_ci(s[ok], float(ci_level))
    res = {"value": point, "ci": [(float(bounds[0, a]), float(bounds[1, a])) for a in range(s.shape[1])],
           "n_undefined": int((~ok).sum()), "n_clusters": int(k),
           "method": "patient-clustered paired percentile bootstrap (strata: patients with/without a negative image) "
                     "of balanced accuracy, per-image correctness averaged over episodes"}
    if len(predictions) >= 2:
        lo, hi = percentile_ci(s[ok, 0] - s[ok, 1], float(ci_level))
        res["diff"], res["diff_ci"] = point[0] - point[1], (float(lo), float(hi))
    return res


def fraction_rows(train_y: np.ndarray, fractions: Sequence[float], *, seed: int) -> dict[float, np.ndarray]:
    """Seeded, class-stratified subsets of the training rows, one per fraction (at least one image per class)."""
    rng = np.random.default_rng(seed)
    out = {}
    for f in fractions:
        keep = []
        for cls in (0, 1):
            members = np.flatnonzero(np.asarray(train_y) == cls)
            n = max(1, int(round(f * members.size)))
            keep.extend(rng.choice(members, size=n, replace=False).tolist())
        out[float(f)] = np.sort(keep)
    return out


def data_efficiency(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                    test_x: np.ndarray, test_y: np.ndarray, *, fractions: Sequence[float], seed: int,
                    cs: Sequence[float] = DEFAULT_CS) -> dict[float, float]:
    """Test AUROC of the validation-tuned linear probe trained on a seeded, class-stratified fraction of the
    training labels (at least one image per class)."""
    out = {}
    for f, keep in fraction_rows(train_y, fractions, seed=seed).items():
        probe = linear_probe(train_x[keep], train_y[keep], val_x, val_y, test_x, cs=cs, seed=seed)
        out[f] = float(roc_auc_score(test_y, probe.test_scores))
    return out


def dice_per_patient(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray], patients: Sequence[str]) -> dict:
    """Foreground Dice per image with any lesion pixel, averaged per patient.

    Images without a lesion are left out of the Dice (their false-positive pixels are counted separately):
    the background class is never averaged in.

    Returns:
        ``{"per_patient": {pid: dice}, "n_images": int, "fp_pixels_lesion_free": int}``.
    """
    per: dict[str, list[float]] = {}
    fp = 0
    n = 0
    for p, t, pid in zip(pred, truth, patients):
        if not t.any():
            fp += int(p.sum())
            continue
        n += 1
        per.setdefault(pid, []).append(float(2 * (p & t).sum() / (p.sum() + t.sum())))
    return {"per_patient": {k: float(np.mean(v)) for k, v in sorted(per.items())}, "n_images": n,
            "fp_pixels_lesion_free": fp}


def mean_ci(values: Sequence[float], *, n_boot: int, ci_level: float, seed: int) -> tuple[float, tuple[float, float]]:
    """Mean of per-patient values with a percentile bootstrap over patients."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise ValueError(f"a bootstrap over patients needs >= 2 patients, got {v.size}")
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(1)
    lo, hi = percentile_ci(boots[:, None], float(ci_level))[:, 0]
    return float(v.mean()), (float(lo), float(hi))


def segmentation_probe(train_tokens: np.ndarray, train_frac: np.ndarray, val_tokens: np.ndarray,
                       val_masks: Sequence[np.ndarray], val_patients: Sequence[str], test_tokens: np.ndarray,
                       test_masks: Sequence[np.ndarray], *, grid: tuple[int, int], positive_min: float = 0.5,
                       cs: Sequence[float] = DEFAULT_CS, seed: int = 0, max_train_tokens: int = 20000
                       ) -> tuple[float, list[np.ndarray]]:
    """A linear classifier on patch tokens -> pixel masks (each token's decision painted over its patch).

    Tokens with lesion fraction >= ``positive_min`` are positive, lesion-free ones negative, the rest left out
    of training; classes are balanced by weight. ``C`` maximises the mean per-patient foreground Dice on
    validation patients. The composition of :func:`segmentation_decisions` (fit) and
    :func:`select_segmentation` (select on validation, predict on test).

    Args:
        train_tokens: ``(n_img, N, d)``; train_frac: ``(n_img, N)`` lesion fraction per token.
        val_tokens, test_tokens: ``(n, N, d)``; val_masks, test_masks: pixel masks (equal shapes within a split).

    Returns:
        ``(chosen C, predicted test pixel masks)``.
    """
    cs_sorted, val_dec, test_dec = segmentation_decisions(train_tokens, train_frac, val_tokens, test_tokens,
                                                          grid=grid, positive_min=positive_min, cs=cs, seed=seed,
                                                          max_train_tokens=max_train_tokens)
    return select_segmentation(cs_sorted, val_dec, val_masks, val_patients, test_dec, test_masks)


def segmentation_decisions(train_tokens: np.ndarray, train_frac: np.ndarray, val_tokens: np.ndarray,
                           test_tokens: np.ndarray, *, grid: tuple[int, int], positive_min: float = 0.5,
                           cs: Sequence[float] = DEFAULT_CS, seed: int = 0, max_train_tokens: int = 20000
                           ) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Fit one linear token classifier per ``C`` on training tokens; their token-grid decisions on val and test.

    Returns:
        ``(sorted Cs, val decisions (k, n_val, *grid) bool, test decisions (k, n_test, *grid) bool)``: everything
        :func:`select_segmentation` needs, a small fraction of the tokens' size.
    """
    x = train_tokens.reshape(-1, train_tokens.shape[-1])
    f = train_frac.reshape(-1)
    keep = np.flatnonzero((f >= positive_min) | (f == 0))
    rng = np.random.default_rng(seed)
    if keep.size > max_train_tokens:
        keep = np.sort(rng.choice(keep, size=max_train_tokens, replace=False))
    y = (f[keep] >= positive_min).astype(np.int8)
    if len(set(y.tolist())) < 2:
        raise ValueError("segmentation probe needs lesion and background tokens among training images")
    scaler = StandardScaler().fit(x[keep])

    def decide(clf: LogisticRegression, tokens: np.ndarray) -> np.ndarray:
        return clf.predict(scaler.transform(tokens.reshape(-1, tokens.shape[-1]))).reshape(len(tokens), *grid)

    cs_sorted, val_dec, test_dec = sorted(float(c) for c in cs), [], []
    for c in cs_sorted:
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
        clf.fit(scaler.transform(x[keep]), y)
        val_dec.append(decide(clf, val_tokens).astype(bool))
        test_dec.append(decide(clf, test_tokens).astype(bool))
    return cs_sorted, np.stack(val_dec), np.stack(test_dec)


def paint_decisions(decisions: np.ndarray, masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Token-grid decisions ``(n, gh, gw)`` painted over their patches, cut to each pixel mask's shape."""
    out = []
    for grid_pred, m in zip(decisions, masks):
        rep = (-(-m.shape[0] // grid_pred.shape[0]), -(-m.shape[1] // grid_pred.shape[1]))
        out.append(np.kron(grid_pred.astype(np.int8), np.ones(rep, dtype=np.int8))[:m.shape[0], :m.shape[1]]
                   .astype(bool))
    return out


def select_segmentation(cs: Sequence[float], val_decisions: np.ndarray, val_masks: Sequence[np.ndarray],
                        val_patients: Sequence[str], test_decisions: np.ndarray, test_masks: Sequence[np.ndarray]
                        ) -> tuple[float, list[np.ndarray]]:
    """``C`` with the best mean per-patient validation Dice (the first on ties, in ``cs`` order); its test masks."""
    best, best_i = -1.0, None
    for i in range(len(cs)):
        dice = dice_per_patient(paint_decisions(val_decisions[i], val_masks), val_masks, val_patients)["per_patient"]
        score = float(np.mean(list(dice.values()))) if dice else 0.0
        if score > best:
            best, best_i = score, i
    return float(cs[best_i]), paint_decisions(test_decisions[best_i], test_masks)
