"""Nuisance families, stable pairs (label-free) and changing pairs (eval-only, matched on dx and site)."""
from __future__ import annotations

import numpy as np
import pytest

from covtoken.data.catalog import load_dataset
from covtoken.data.layout import EvalMasks, ImageItem, SealedMask
from covtoken.data.nuisance import (FAMILIES, LUMA_WEIGHTS, NuisanceParams, apply_nuisance, augment, nuisance_rng,
                                    sample_nuisance)
from covtoken.data.pairs import lesion_table, plan_views, render_views, representatives, stable_pairs, train_families
from covtoken.eval.change import EvalLesions, build_pairs, lesion_clusters


@pytest.fixture(scope="module")
def derm():
    return load_dataset("phantom-derm", seed=4, n_patients=6, per_patient=2, size=48)


def test_families_are_disjoint_and_each_changes_what_it_should(derm):
    ops = [op for fam in FAMILIES.values() for op in fam]
    assert len(ops) == len(set(ops)) and set(FAMILIES) == {"lighting", "geometry", "colour"}
    img = derm.items[0].image
    for fam in FAMILIES:
        out, params = augment(img, fam, seed=0, key="a")
        assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert not np.allclose(out, img, atol=1e-3), fam
        again, _ = augment(img, fam, seed=0, key="a")
        assert np.array_equal(out, again)                                  # deterministic from (seed, key)
        assert not np.array_equal(out, augment(img, fam, seed=1, key="a")[0])
        assert not np.array_equal(out, augment(img, fam, seed=0, key="b")[0])
        np.testing.assert_allclose(apply_nuisance(img, NuisanceParams.identity(fam)), img, atol=1e-6)
    grey = np.repeat(np.linspace(0.1, 0.9, 48 * 48).reshape(48, 48, 1), 3, axis=2).astype(np.float32)
    lit, _ = augment(grey, "lighting", seed=0, key="g")
    assert np.allclose(lit[..., 0], lit[..., 1]) and np.allclose(lit[..., 1], lit[..., 2])  # no colour cast
    hue = NuisanceParams("colour", (("hue_deg", 25.0), ("saturation", 1.3), ("wb_r", 1.0), ("wb_g", 1.0),
                                    ("wb_b", 1.0)))
    mid = (0.3 + 0.3 * np.random.default_rng(0).random((20, 20, 3))).astype(np.float32)
    np.testing.assert_allclose(apply_nuisance(mid, hue) @ LUMA_WEIGHTS, mid @ LUMA_WEIGHTS, atol=2e-4)  # luma kept
    gains = sample_nuisance("colour", nuisance_rng(3, "x")).as_dict()
    assert LUMA_WEIGHTS @ [gains["wb_r"], gains["wb_g"], gains["wb_b"]] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown nuisance family"):
        sample_nuisance("blur", nuisance_rng(0, "x"))
    with pytest.raises(ValueError, match="RGB"):
        augment(grey[..., 0], "colour", seed=0, key="g")


def test_geometry_rotates_about_the_centre():
    img = np.zeros((33, 33), np.float32)
    img[16, 26] = 1.0  # right of the centre
    p = NuisanceParams("geometry", (("rotation_deg", 90.0), ("flip_h", 0.0), ("flip_v", 0.0), ("scale", 1.0),
                                    ("shift_y", 0.0), ("shift_x", 0.0)))
    out = apply_nuisance(img, p)
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert peak in ((6, 16), (26, 16)) and out.max() == pytest.approx(1.0, abs=1e-5)


def test_stable_pairs_are_label_free_views_of_one_image(derm):
    table = lesion_table(derm.items)
    ids = sorted(table.lesion_of)[:4]
    views = plan_views(table, ids, train_families("colour"), n_views=3, seed=7)
    assert [v.params.family for v in views[:3]] == ["lighting", "geometry", "lighting"]
    pairs = stable_pairs(views)
    assert all(p.target.startswith(p.context + "~") and p.lesion_id == table.lesion_of[p.context] for p in pairs)
    assert all(p.family != "colour" for p in pairs)
    pixels = render_views({it.image_id: it.image for it in derm.items}, views, seed=7)
    again = render_views({it.image_id: it.image for it in derm.items}, views[::-1], seed=7)  # order does not matter
    assert all(np.array_equal(pixels[k], again[k]) for k in pixels)
    with pytest.raises(RuntimeError, match="differ from the plan"):
        render_views({it.image_id: it.image for it in derm.items}, views, seed=8)
    bad = [ImageItem(image=np.zeros((8, 8), np.float32), image_id="x", patient_id="p", modality="dermoscopy")]
    with pytest.raises(ValueError, match="lesion_id"):
        lesion_table(bad)


def synthetic_split(dx: dict[str, str], site: dict[str, str]):
    items, masks = [], {}
    for lid in dx:
        iid = f"{lid}-img"
        items.append(ImageItem(image=np.zeros((4, 4), np.float32), image_id=iid, patient_id=f"p-{lid}",
                               modality="dermoscopy", meta={"lesion_id": lid, "site": site[lid]}))
        masks[iid] = SealedMask(np.zeros((4, 4), bool), source=iid, labels={"dx": dx[lid]})
    table = lesion_table(items)
    reps = representatives(table, {it.patient_id for it in items})
    lesions = EvalLesions(reps=reps, sites={l: table.site_of[i] for l, i in reps.items()},
                          patients={l: table.patient_of[i] for l, i in reps.items()},
                          view_of={i: f"{i}~colour~0" for i in reps.values()})
    return lesions, EvalMasks(masks, items)


def test_changing_pairs_match_dx_and_site_and_clusters_hold_lesion_pairs():
    rng = np.random.default_rng(0)
    lids = [f"L{i:02d}" for i in range(40)]
    dx = {lid: str(rng.choice(["nv", "mel", "bkl"])) for lid in lids}
    site = {lid: str(rng.choice(["back", "face"])) for lid in lids}
    lesions, masks = synthetic_split(dx, site)
    pairs = build_pairs(lesions, masks, seed=3)
    stable, changing = pairs.label == 0, pairs.label == 1
    assert stable.sum() == 40 and (pairs.lesion_context[stable] == pairs.lesion_target[stable]).all()
    for a, b, tgt in zip(pairs.lesion_context[changing], pairs.lesion_target[changing], pairs.target[changing]):
        assert a != b and dx[a] == dx[b] and site[a] == site[b] and tgt == f"{b}-img~colour~0"
    strata = {(dx[l], site[l]) for l in lids}
    n_odd = sum(sum(1 for l in lids if (dx[l], site[l]) == s) % 2 for s in strata)
    assert len(pairs.unmatched) == n_odd and changing.sum() == 2 * (40 - n_odd) // 2
    # a cluster is a coupled lesion pair (or one unmatched lesion): every pair inside one, no lesion in two
    owner: dict[str, int] = {}
    for la, lb, c in zip(pairs.lesion_context, pairs.lesion_target, pairs.cluster):
        assert owner.setdefault(la, c) == c and owner.setdefault(lb, c) == c
    assert max(np.bincount(pairs.cluster)) <= 4
    assert not np.array_equal(build_pairs(lesions, masks, seed=4).lesion_target, pairs.lesion_target)
    no_dx = EvalMasks({k: SealedMask(np.zeros((4, 4), bool), source=k) for k in masks})
    with pytest.raises(KeyError, match="dx"):
        build_pairs(lesions, no_dx, seed=3)


def test_lesion_clusters_are_connected_components():
    c = lesion_clusters(["a", "b", "c", "d", "e"], ["a", "c", "b", "e", "d"])
    assert c[1] == c[2] and c[3] == c[4] and len({c[0], c[1], c[3]}) == 3


def test_stable_and_changing_pairs_go_through_one_pipeline():
    """No re-encoding asymmetry: in both kinds the context is a loaded image and the target a held-out view, so
    how the pixels were produced cannot tell the kinds apart; only which lesion the target shows differs."""
    rng = np.random.default_rng(1)
    lids = [f"L{i:02d}" for i in range(30)]
    lesions, masks = synthetic_split({l: str(rng.choice(["nv", "mel"])) for l in lids},
                                     {l: "back" for l in lids})
    pairs = build_pairs(lesions, masks, seed=0)
    images, views = set(lesions.reps.values()), set(lesions.view_of.values())
    for kind in (0, 1):
        sel = pairs.label == kind
        assert sel.any()
        assert set(pairs.context[sel].tolist()) <= images and set(pairs.target[sel].tolist()) <= views
    # every target view is used once as a stable target and (when matched) once as a changing target
    stable_targets = pairs.target[pairs.label == 0].tolist()
    assert sorted(stable_targets) == sorted(views)
