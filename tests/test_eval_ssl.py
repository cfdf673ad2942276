"""The frozen-feature evaluation suite: probes select on validation, CIs respect patients, Dice ignores background."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covtoken.eval.ssl import (balanced_accuracy_ci, data_efficiency, dice_per_patient, knn_episodes, linear_probe,
                               mean_ci, segmentation_decisions, segmentation_probe, select_segmentation)


def split(rng, n_pat: int, per: int, signal: float, d: int = 8):
    pats = np.repeat([f"p{rng.integers(1e9)}-{i}" for i in range(n_pat)], per)
    y = (rng.random(pats.size) < 0.5).astype(np.int8)
    y[::per] = 1
    y[1::per] = 0
    x = rng.standard_normal((pats.size, d))
    x[:, 0] += signal * y
    return x, y, pats


def test_linear_probe_learns_signal_and_chooses_c_on_validation():
    rng = np.random.default_rng(0)
    (xtr, ytr, _), (xva, yva, _), (xte, yte, _) = (split(rng, 20, 4, 2.0) for _ in range(3))
    p = linear_probe(xtr, ytr, xva, yva, xte, cs=(0.001, 1.0))
    assert roc_auc_score(yte, p.test_scores) > 0.85
    assert p.chosen_c == max(p.val_auroc, key=lambda c: (p.val_auroc[c], -c))
    noise = linear_probe(rng.standard_normal(xtr.shape), ytr, rng.standard_normal(xva.shape), yva,
                         rng.standard_normal(xte.shape))
    assert abs(roc_auc_score(yte, noise.test_scores) - 0.5) < 0.2
    with pytest.raises(ValueError, match="both classes"):
        linear_probe(xtr, np.ones_like(ytr), xva, yva, xte)


def test_knn_supports_come_from_distinct_patients_when_possible(monkeypatch):
    rng = np.random.default_rng(1)
    x, y, pats = split(rng, 12, 4, 3.0)
    seen = []
    from sklearn.neighbors import KNeighborsClassifier

    real_fit = KNeighborsClassifier.fit

    def spy(self, xs, ys):
        seen.append(xs.copy())
        return real_fit(self, xs, ys)

    monkeypatch.setattr(KNeighborsClassifier, "fit", spy)
    pred = knn_episodes(x, y, pats, x[:10], shots=5, n_episodes=3, seed=0)
    assert pred.shape == (3, 10)
    for xs in seen:
        rows = [int(np.flatnonzero((x == r).all(1))[0]) for r in xs]
        for cls in (0, 1):
            members = [r for r in rows if y[r] == cls]
            assert len(members) == 5 and len({pats[r] for r in members}) == 5


def test_balanced_accuracy_ci_detects_the_better_arm_and_is_exact_for_perfect_predictions():
    rng = np.random.default_rng(2)
    y = np.tile([0, 1, 1, 1], 20)
    pats = np.repeat(np.arange(20), 4)
    good = np.where(rng.random((10, y.size)) < 0.9, y, 1 - y)
    bad = np.where(rng.random((10, y.size)) < 0.6, y, 1 - y)
    res = balanced_accuracy_ci([good, bad], y, pats, n_boot=300, ci_level=0.95, seed=0)
    assert res["diff_ci"][0] > 0 and res["value"][0] > res["value"][1]
    perfect = balanced_accuracy_ci([np.tile(y, (3, 1)), np.tile(1 - y, (3, 1))], y, pats, n_boot=100, ci_level=0.95,
                                   seed=0)
    assert perfect["value"] == [1.0, 0.0] and perfect["ci"][0] == (1.0, 1.0)


def test_clustered_ci_is_wider_than_pretending_images_are_independent():
    rng = np.random.default_rng(3)
    y = np.tile([0, 1], 100)
    pats = np.repeat(np.arange(10), 20)
    # whole patients right or wrong: strongly clustered correctness
    right = rng.random(10) < 0.6
    pred = np.where(right[pats], y, 1 - y)[None]
    clustered = balanced_accuracy_ci([pred], y, pats, n_boot=500, ci_level=0.95, seed=0)["ci"][0]
    iid = balanced_accuracy_ci([pred], y, np.arange(y.size), n_boot=500, ci_level=0.95, seed=0)["ci"][0]
    assert clustered[1] - clustered[0] > 2 * (iid[1] - iid[0])


def test_dice_never_averages_background_in():
    t = np.zeros((8, 8), bool)
    t[2:4, 2:4] = True
    empty = np.zeros((8, 8), bool)
    res = dice_per_patient([t, empty, empty], [t, empty, empty], ["a", "a", "b"])
    assert res["per_patient"] == {"a": 1.0} and res["n_images"] == 1  # lesion-free images are not "Dice 1"
    miss = dice_per_patient([empty, t], [t, empty], ["a", "b"])
    assert miss["per_patient"] == {"a": 0.0} and miss["fp_pixels_lesion_free"] == 4


def test_mean_ci_brackets_the_mean():
    v, (lo, hi) = mean_ci([0.1, 0.5, 0.9, 0.4], n_boot=500, ci_level=0.95, seed=0)
    assert lo < v < hi and v == pytest.approx(0.475)


def test_segmentation_probe_finds_planted_lesion_tokens():
    rng = np.random.default_rng(4)
    grid = (4, 4)

    def make(n):
        frac = np.zeros((n, 16))
        masks = []
        for i in range(n):
            k = rng.integers(16)
            frac[i, k] = 1.0
            m = np.zeros((16, 16), bool)
            r, c = divmod(int(k), 4)
            m[4 * r:4 * r + 4, 4 * c:4 * c + 4] = True
            masks.append(m)
        tok = rng.standard_normal((n, 16, 6))
        tok[..., 0] += 4 * frac
        return tok, frac, masks

    tr, ftr, _ = make(30)
    va, _, mva = make(10)
    te, _, mte = make(10)
    c, pred = segmentation_probe(tr, ftr, va, mva, [f"v{i}" for i in range(10)], te, mte, grid=grid)
    dice = dice_per_patient(pred, mte, [f"t{i}" for i in range(10)])["per_patient"]
    assert np.mean(list(dice.values())) > 0.8
    # the stored form (fit: decisions per C; select/judge from them) gives the same choice and the same masks
    cs, vd, td = segmentation_decisions(tr, ftr, va, te, grid=grid)
    c2, pred2 = select_segmentation(cs, vd, mva, [f"v{i}" for i in range(10)], td, mte)
    assert c2 == c and all(np.array_equal(a, b) for a, b in zip(pred2, pred))


def test_stored_probe_decisions_give_the_fitted_probe():
    """fit (decisions per C) then select (C on validation) equals the one-call probe, without refitting."""
    from covtoken.eval.ssl import probe_decisions, select_probe

    rng = np.random.default_rng(11)
    (xtr, ytr, _), (xva, yva, _), (xte, _, _) = (split(rng, 20, 4, 1.0) for _ in range(3))
    one = linear_probe(xtr, ytr, xva, yva, xte, cs=(10.0, 0.001, 1.0))
    cs, (vd, td) = probe_decisions(xtr, ytr, [xva, xte], cs=(10.0, 0.001, 1.0))
    two = select_probe(cs, vd, yva, td)
    assert cs == [0.001, 1.0, 10.0] and vd.shape == (3, len(xva)) and td.shape == (3, len(xte))
    assert two.chosen_c == one.chosen_c and two.val_auroc == one.val_auroc
    assert np.array_equal(two.test_scores, one.test_scores)
    # selection reads validation only: swapping the test decisions of the other Cs changes nothing chosen
    td2 = td.copy()
    td2[[k for k, c in enumerate(cs) if c != two.chosen_c]] = 0.0
    assert np.array_equal(select_probe(cs, vd, yva, td2).test_scores, two.test_scores)


def test_data_efficiency_uses_fewer_labels_and_keeps_both_classes(monkeypatch):
    import covtoken.eval.ssl as ssl

    rng = np.random.default_rng(5)
    (xtr, ytr, _), (xva, yva, _), (xte, yte, _) = (split(rng, 25, 4, 3.0) for _ in range(3))
    sizes = []
    real = ssl.linear_probe

    def spy(tx, ty, *a, **k):
        sizes.append((len(ty), int(ty.sum())))
        return real(tx, ty, *a, **k)

    monkeypatch.setattr(ssl, "linear_probe", spy)
    curve = data_efficiency(xtr, ytr, xva, yva, xte, yte, fractions=[0.01, 0.1, 1.0], seed=0)
    assert set(curve) == {0.01, 0.1, 1.0} and curve[1.0] > 0.8
    assert sizes[0] == (2, 1) and sizes[-1] == (len(ytr), int(ytr.sum())) and sizes[0][0] < sizes[1][0] < sizes[2][0]
