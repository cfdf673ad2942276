"""Volumetric aggregation against explicit loops, and its failure modes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from covtoken.arch.volumetric import (aggregate_volumes, group_volumes, select_slices, slice_scores,
                                      smooth_across_slices, volume_score)


def test_group_volumes_orders_slices_by_position():
    ids = ["b", "a", "b", "a", "b"]
    pos = [3.0, 1.25, -1.0, 0.0, 1.0]
    vols = group_volumes(ids, pos)
    assert [v.volume_id for v in vols] == ["a", "b"]
    assert vols[0].rows.tolist() == [3, 1] and vols[1].rows.tolist() == [2, 4, 0]
    assert vols[1].positions.tolist() == [-1.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="volume 'a': two slices at position 0.0"):
        group_volumes(["a", "a"], [0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        group_volumes(["a"], [np.nan])


def test_slice_and_volume_reducers_match_loops():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 4, 4))
    flat = s.reshape(5, -1)
    np.testing.assert_array_equal(slice_scores(s, reduce="max"), [max(r) for r in flat])
    np.testing.assert_allclose(slice_scores(s, reduce="mean"), [sum(r) / 16 for r in flat])
    np.testing.assert_allclose(slice_scores(s, reduce="top_fraction", fraction=0.2),  # ceil(3.2) = 4 tokens
                               [np.mean(sorted(r)[-4:]) for r in flat])
    per = slice_scores(s)
    assert volume_score(per, reduce="top_k_mean", k=2) == pytest.approx(np.mean(sorted(per)[-2:]))
    assert volume_score(per, reduce="top_k_mean", k=9) == pytest.approx(per.mean())
    assert volume_score(per, reduce="max") == per.max()
    with pytest.raises(ValueError, match="top_k_mean"):
        volume_score(per, reduce="median")
    with pytest.raises(ValueError, match="top_fraction"):
        slice_scores(s, reduce="p99")


def test_select_slices_ties_and_order():
    assert select_slices(np.array([0.1, 0.9, 0.5, 0.9, 0.2]), 2).tolist() == [1, 3]
    assert select_slices(np.array([0.3, 0.3, 0.3]), 2).tolist() == [0, 1]
    assert select_slices(np.array([5.0, 1.0, 4.0]), 2).tolist() == [0, 2]
    with pytest.raises(ValueError, match="k=4"):
        select_slices(np.zeros(3), 4)


def mirror(i: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices about the edges without repeating them (-1 -> 1, n -> n - 2)."""
    if n == 1:
        return np.zeros_like(i)
    i = np.abs(i)
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


def brute_force_filter(s: np.ndarray, size: tuple[int, int, int], fn) -> np.ndarray:
    out = np.empty_like(s)
    r = [z // 2 for z in size]
    for i, j, k in itertools.product(*map(range, s.shape)):
        idx = [mirror(np.arange(c - h, c + h + 1), n) for c, h, n in zip((i, j, k), r, s.shape)]
        out[i, j, k] = fn(s[np.ix_(*idx)])
    return out


@pytest.mark.parametrize("mode, fn", [("max", np.max), ("mean", np.mean)])
def test_smoothing_matches_a_neighbourhood_loop(mode, fn):
    s = np.random.default_rng(1).normal(size=(4, 5, 3))
    for size in ((3, 3, 3), (1, 3, 3), (3, 1, 1), (5, 3, 1)):
        np.testing.assert_allclose(smooth_across_slices(s, size=size, mode=mode), brute_force_filter(s, size, fn))


def test_mean_smoothing_favours_a_lesion_on_adjacent_slices_over_a_single_spike():
    s = np.zeros((6, 8, 8))
    s[2:4, 2, 2] = 1.0  # a nodule seen on two adjacent slices
    s[0, 6, 6] = 1.0  # a one-slice spike of the same height, on the edge slice (mirrored, not counted twice)
    s[4, 5, 1] = 1.0  # and one inside the volume
    sm = smooth_across_slices(s, size=(3, 3, 3), mode="mean", positions=np.arange(6) * 1.25)
    assert sm[2, 2, 2] == pytest.approx(2 / 27)
    assert sm[0, 6, 6] == pytest.approx(1 / 27) and sm[4, 5, 1] == pytest.approx(1 / 27)


def test_smoothing_refuses_uneven_slices_and_bad_sizes():
    s = np.zeros((4, 2, 2))
    with pytest.raises(ValueError, match="gap 5.0 between positions 2.0 and 7.0"):
        smooth_across_slices(s, positions=np.array([0.0, 1.0, 2.0, 7.0]))
    with pytest.raises(ValueError, match="odd"):
        smooth_across_slices(s, size=(2, 3, 3))
    with pytest.raises(ValueError, match="'max' or 'mean'"):
        smooth_across_slices(s, mode="median")


def test_aggregate_volumes_end_to_end():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(7, 16))
    scores[4, 3] = 10.0  # the hottest token, in volume "p1"
    ids = ["p0", "p1", "p0", "p1", "p1", "p0", "p1"]
    pos = [2, 0, 0, 1, 3, 1, 2]
    agg = aggregate_volumes(scores, ids, pos, slice_reduce="max", volume_reduce="max", k=2)
    assert agg["p1"]["rows"].tolist() == [1, 3, 6, 4]
    assert agg["p1"]["score"] == 10.0 and 4 in agg["p1"]["top_rows"].tolist()
    ref = [scores[r].max() for r in agg["p0"]["rows"]]
    np.testing.assert_array_equal(agg["p0"]["slice_scores"], ref)
    assert agg["p0"]["score"] == max(ref) < agg["p1"]["score"]
    with pytest.raises(ValueError, match="one row per volume id"):
        aggregate_volumes(scores, ids[:-1], pos[:-1])
