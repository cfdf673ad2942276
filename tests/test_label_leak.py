"""Masks and labels reach only evaluation.

(a) G1's label-free stage (token bank, subspace fit and scores, baseline) is bit-identical when the masks it
    is handed are permuted across images or zeroed;
(b) a planted leak (a stage that peeks at the masks) is caught by that same check, and a scorer that tries
    to open a mask is stopped at run time;
(c) nothing under subspace/, coverage/, gate/ or arch/ imports the mask loader, statically or at import time,
    and the static check flags a planted import;
(d) a sealed mask has no private attribute holding its pixels, and no module outside data/ and eval/ touches the
    sealed-mask vault by attribute, getattr or import (the static check flags planted ones).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.backbone.frozen import load_backbone
from covtoken.data.catalog import LoadedDataset, load_dataset
from covtoken.data.layout import EvalMasks, LabelLeakError, SealedMask, unseal
from covtoken.data.splits import split_patients
from g1_helpers import load_job

LABEL_FREE_PACKAGES = ("subspace", "coverage", "gate", "arch")
FORBIDDEN = ("covtoken.data", "covtoken.eval")


@pytest.fixture(scope="module")
def setting():
    job = load_job("g1_lesion_subspace")
    data = load_dataset("phantom-ct", seed=3, n_patients=12, per_patient=3)
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                            seed=0)
    params = {"final_norm": False, "construction_params": {"knn_k": 3, "pca_explained_variance": 0.9},
              "max_fit_tokens": 5000}
    cfg = replace(job.G1Config(), batch_size=16)
    return job, data, splits, params, cfg, load_backbone("tiny-vit")


def with_masks(data: LoadedDataset, how: str) -> LoadedDataset:
    ids = [it.image_id for it in data.items]
    if how == "permuted":
        perm = np.random.default_rng(0).permutation(len(ids))
        new = {iid: data.masks[ids[j]] for iid, j in zip(ids, perm)}
    elif how == "zeroed":
        new = {iid: SealedMask(np.zeros(data.masks[iid].shape, bool), source=f"zero/{iid}") for iid in ids}
    else:
        raise ValueError(how)
    return LoadedDataset(data.items, EvalMasks(new, data.items), data.provenance)


def stage_output(stage, data, setting, work: Path) -> dict[str, np.ndarray]:
    _, _, splits, params, cfg, bb = setting
    bank, rows, scores, bright = stage(data, bb, splits, params, cfg, work)
    return {**{f"score:{k}": v for k, v in scores.items()}, "brightness": bright,
            **{f"rows:{k}": v for k, v in rows.items()}, "bank:block0": bank.tokens(0)}


def assert_label_invariant(stage, setting, tmp_path: Path) -> None:
    """The check itself: identical bits for original, permuted and zeroed masks."""
    _, data, *_ = setting
    ref = stage_output(stage, data, setting, tmp_path / "orig")
    for how in ("permuted", "zeroed"):
        out = stage_output(stage, with_masks(data, how), setting, tmp_path / how)
        assert out.keys() == ref.keys()
        for k in ref:
            assert out[k].dtype == ref[k].dtype and np.array_equal(out[k], ref[k]), f"{k} changed with {how} masks"


def test_g1_label_free_stage_is_invariant_to_masks(setting, tmp_path):
    job = setting[0]
    assert_label_invariant(job.label_free_stage, setting, tmp_path)


def test_planted_leak_is_caught_by_the_same_check(setting, tmp_path):
    job = setting[0]

    def leaky_stage(data, bb, splits, params, cfg, work):
        bank, rows, scores, bright = job.label_free_stage(data, bb, splits, params, cfg, work)
        from covtoken.eval.labels import token_lesion_fraction  # the peek

        frac = token_lesion_fraction(data.masks, bank.image_ids, bank.grid)
        r = np.concatenate([rows["val"], rows["test"]])
        first = sorted(scores)[0]
        scores = {**scores, first: scores[first] + 1e-9 * frac[r].reshape(-1)}
        return bank, rows, scores, bright

    with pytest.raises(AssertionError, match="changed with permuted masks"):
        assert_label_invariant(leaky_stage, setting, tmp_path)


def test_masks_cannot_be_opened_outside_eval(setting):
    _, data, *_ = setting
    mask = next(iter(data.masks.values()))
    with pytest.raises(LabelLeakError):
        np.asarray(mask)
    with pytest.raises(LabelLeakError, match="only covtoken.eval"):
        unseal(mask)  # called from a test module, not from covtoken.eval
    # a scorer (code under covtoken.subspace) that tries to read a mask is stopped
    ns = {"__name__": "covtoken.subspace.cheat", "unseal": unseal}
    exec("def peek(m):\n    return unseal(m)\n", ns)
    with pytest.raises(LabelLeakError, match="covtoken.subspace.cheat"):
        ns["peek"](mask)


def forbidden_imports(source: str, package: str) -> list[str]:
    """Imports of covtoken.data / covtoken.eval (absolute or relative) in one module's source."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against covtoken.<package>.<module>
                parent = ["covtoken", package][: max(0, 2 - (node.level - 1))]
                base = ".".join(parent + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        bad += [n for n in names if n == "data" or n.startswith("data.") or any(
            n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    return bad


def test_static_check_flags_a_planted_import():
    assert forbidden_imports("from ..data.busi import load_busi\n", "subspace")
    assert forbidden_imports("import covtoken.eval.labels\n", "coverage")
    assert forbidden_imports("from covtoken.data import layout\n", "gate")
    assert not forbidden_imports("from .density import GaussianDensity\nimport numpy as np\n", "subspace")


@pytest.mark.parametrize("package", LABEL_FREE_PACKAGES)
def test_label_free_packages_do_not_import_masks(package):
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for f in files:
        assert not forbidden_imports(f.read_text(), package), f"{f} imports {forbidden_imports(f.read_text(), package)}"


def test_importing_label_free_packages_loads_no_mask_code():
    code = ("import sys; import " + ", ".join(f"covtoken.{p}" for p in LABEL_FREE_PACKAGES) + "; "
            "print([m for m in sys.modules if m.startswith(('covtoken.data', 'covtoken.eval'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------------------
# G4 (conformal retention) and G5 (routed depth): their label-free stages get the same check.
@pytest.fixture(scope="module")
def arch_setting():
    data = load_dataset("phantom-ct", seed=4, n_patients=8, per_patient=2)
    return data, load_backbone("tiny-vit")


def assert_stage_invariant(stage_arrays, data: LoadedDataset, tmp_path: Path) -> None:
    """``stage_arrays(data, work) -> {name: array}`` must give identical bits for original, permuted, zeroed masks."""
    ref = stage_arrays(data, tmp_path / "orig")
    for how in ("permuted", "zeroed"):
        out = stage_arrays(with_masks(data, how), tmp_path / how)
        assert out.keys() == ref.keys()
        for k in ref:
            assert out[k].dtype == ref[k].dtype and np.array_equal(out[k], ref[k]), f"{k} changed with {how} masks"


def _g4_stage(data: LoadedDataset, bb, leak: bool = False):
    job = load_job("g4_conformal_retention")
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.4, "calib": 0.3, "test": 0.3},
                            seed=0)
    params = {"score_block": 1, "final_norm": False, "max_fit_tokens": 5000, "score_construction": "A_gauss",
              "construction_params": {}}
    cfg = replace(job.G4Config(), batch_size=16)

    def arrays(d: LoadedDataset, work: Path) -> dict[str, np.ndarray]:
        bank, rows, scores = job.label_free_stage(d, bb, splits, params, cfg, work)
        if leak:
            from covtoken.eval.labels import token_lesion_fraction  # the peek

            pool = np.concatenate([rows["calib"], rows["test"]])
            scores = scores + 1e-9 * token_lesion_fraction(d.masks, [bank.image_ids[i] for i in pool], bank.grid)
        return {"scores": scores, **{f"rows:{k}": v for k, v in rows.items()}, "bank:block1": bank.tokens(1)}
    return arrays


def test_g4_label_free_stage_is_invariant_to_masks(arch_setting, tmp_path):
    data, bb = arch_setting
    assert_stage_invariant(_g4_stage(data, bb), data, tmp_path)


def test_g4_planted_leak_is_caught(arch_setting, tmp_path):
    data, bb = arch_setting
    with pytest.raises(AssertionError, match="scores changed with permuted masks"):
        assert_stage_invariant(_g4_stage(data, bb, leak=True), data, tmp_path)


def test_g5_label_free_stage_is_invariant_to_masks(arch_setting, tmp_path):
    data, bb = arch_setting
    job = load_job("g5_routed_depth")
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "test": 0.5}, seed=0)
    params = {"max_fit_tokens": 5000, "router_construction": "A_gauss", "construction_params": {}, "exit_after": 1,
              "keep_fraction": 0.3, "timing_batch": 4}
    cfg = replace(job.G5Config(), batch_size=16)

    def arrays(d: LoadedDataset, work: Path) -> dict[str, np.ndarray]:
        bank, rows, scores, routed = job.label_free_stage(d, bb, splits, params, cfg, work)
        macs = routed["macs"]
        return {**{f"scores@{k}": v for k, v in scores.items()}, **{f"rows:{k}": v for k, v in rows.items()},
                "kept": routed["kept"], "probe": routed["probe"].numpy(),
                "macs": np.array([macs["full_counted"], macs["routed_counted"], macs["routed_analytic"]])}

    assert_stage_invariant(arrays, data, tmp_path)


# --------------------------------------------------------------------------- G7: probe training never sees labels
@pytest.fixture(scope="module")
def g7_setting():
    job = load_job("g7_dermajepa_probe")
    data = load_dataset("phantom-derm", seed=5, n_patients=16, per_patient=2, size=64)
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                            seed=0)
    params = {"held_out_family": "colour", "train_views_per_image": 2, "train_seeds": [0, 1],
              "heads": [{"kind": "linear", "optimizer": "adam", "lr": 0.01, "epochs": 3, "batch_size": 16},
                        {"kind": "mlp", "optimizer": "sgd", "lr": 0.1, "epochs": 3, "batch_size": 16}]}
    return job, data, splits, params, replace(job.G7Config(), batch_size=32), load_backbone("tiny-vit")


def _g7_arrays(stage, g7) -> "Callable[[LoadedDataset, Path], dict[str, np.ndarray]]":
    _, _, splits, params, cfg, bb = g7

    def arrays(d: LoadedDataset, work: Path) -> dict[str, np.ndarray]:
        lf = stage(d, bb, splits, params, cfg)
        out = {"embeddings": lf.embeddings, "keys": np.array(lf.keys),
               "views": np.array([[p for _, p in v.params.values] for v in lf.train_views if v.index == 0])}
        for head, probes in lf.trained.items():
            for t in probes:
                out[f"{head}/seed{t.seed}:losses"] = t.losses
                out.update({f"{head}/seed{t.seed}:{k}": v for k, v in t.params.items()})
        return out

    return arrays


def test_g7_probe_training_is_invariant_to_masks_and_diagnoses(g7_setting, tmp_path):
    job, data = g7_setting[0], g7_setting[1]
    assert_stage_invariant(_g7_arrays(job.label_free_stage, g7_setting), data, tmp_path)


def test_g7_planted_leak_training_on_changing_pairs_is_caught(g7_setting, tmp_path):
    job, data = g7_setting[0], g7_setting[1]

    def leaky_stage(d, bb, splits, params, cfg):
        from covtoken.arch.probe import HeadConfig, train_probe
        from covtoken.data.pairs import representatives
        from covtoken.eval.change import EvalLesions, build_pairs  # the leak: changing pairs need the diagnosis

        lf = job.label_free_stage(d, bb, splits, params, cfg)
        reps = representatives(lf.table, splits["train"])
        first_view = {v.image_id: v.key for v in lf.train_views if v.index == 0}
        lesions = EvalLesions(reps=reps, sites={l: lf.table.site_of[i] for l, i in reps.items()},
                              patients={l: lf.table.patient_of[i] for l, i in reps.items()}, view_of=first_view)
        pairs = build_pairs(lesions, d.masks, seed=0)
        row = {k: i for i, k in enumerate(lf.keys)}
        zc = lf.embeddings[[row[k] for k in pairs.context]]
        zt = lf.embeddings[[row[k] for k in pairs.target]]
        head = HeadConfig.from_dict(params["heads"][0])
        lf.trained[head.name] = [train_probe(zc, zt, head, seed=s) for s in params["train_seeds"]]
        return lf

    with pytest.raises(AssertionError, match="changed with permuted masks"):
        assert_stage_invariant(_g7_arrays(leaky_stage, g7_setting), data, tmp_path)


# --------------------------------------------------------------------------- G3 and G6: pruning arms never see labels
_PRUNE_PARAMS = {"final_norm": False, "construction_params": {"knn_k": 3, "pca_explained_variance": 0.9},
                 "max_fit_tokens": 5000, "high_norm_factor": 4.0,
                 "pruner": {"functional": "coding_rate", "eps": 0.5, "target": 0.95, "steps": 20, "lr": 0.1,
                            "dual_lr": 2.0, "init_log_alpha": 3.0, "log_every": 10}}


def _prune_splits(data: LoadedDataset) -> dict:
    return split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                          seed=0)


def _g3_arrays(bb, leak: bool = False):
    job = load_job("g3_membership_vs_saliency")
    cfg = replace(job.G3Config(), batch_size=16)

    def arrays(d: LoadedDataset, work: Path) -> dict[str, np.ndarray]:
        lf = job.label_free_stage(d, bb, _prune_splits(d), _PRUNE_PARAMS, cfg, work)
        saliency = dict(lf.saliency)
        if leak:
            from covtoken.eval.labels import token_lesion_fraction  # the peek

            pool = np.concatenate([lf.rows["val"], lf.rows["test"]])
            frac = token_lesion_fraction(d.masks, [lf.bank.image_ids[i] for i in pool], lf.bank.grid)
            saliency[0] = saliency[0] + 1e-6 * frac
        return {**{f"membership:{k}": v for k, v in lf.membership.items()},
                **{f"saliency:{k}": v for k, v in saliency.items()}, **{f"high_norm:{k}": v for k, v in lf.high_norm.items()},
                **{f"rows:{k}": v for k, v in lf.rows.items()}}
    return arrays


def test_g3_label_free_stage_is_invariant_to_masks(arch_setting, tmp_path):
    data, bb = arch_setting
    assert_stage_invariant(_g3_arrays(bb), data, tmp_path)


def test_g3_planted_leak_into_the_saliency_arm_is_caught(arch_setting, tmp_path):
    data, bb = arch_setting
    with pytest.raises(AssertionError, match="saliency:0 changed with permuted masks"):
        assert_stage_invariant(_g3_arrays(bb, leak=True), data, tmp_path)


def test_g6_label_free_stage_and_pruner_are_invariant_to_masks(arch_setting, tmp_path):
    data, bb = arch_setting
    job = load_job("g6_coverage_pruner")
    cfg = replace(job.G6Config(), batch_size=16)

    def arrays(d: LoadedDataset, work: Path) -> dict[str, np.ndarray]:
        bank, rows, membership = job.label_free_stage(d, bb, _prune_splits(d), _PRUNE_PARAMS, cfg, work)
        pruned = job.prune_stage(bank.tokens(1, rows["test"]), _PRUNE_PARAMS, seed=0)
        return {**{f"membership:{k}": v for k, v in membership.items()}, "kept": pruned.kept,
                "log_alpha": pruned.log_alpha, "lambda": pruned.lam, **{f"rows:{k}": v for k, v in rows.items()}}

    assert_stage_invariant(arrays, data, tmp_path)


# --------------------------------------------------------------------------- (d) no reachable private attribute
#: names under which the sealed pixels/labels live (or lived); touching them outside data/ and eval/ is a leak
SEALED_NAMES = frozenset({"_VAULT", "_open", "_array", "_labels", "_check_caller"})
MASK_ROOMS = ("data", "eval")


def private_mask_access(source: str) -> list[str]:
    """Attribute reads, getattr/setattr/hasattr/vars strings and imports of the sealed-mask internals."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in SEALED_NAMES:
            bad.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr", "delattr"):
            # (a computed name cannot reach pixels on the mask itself: it has no attribute holding them)
            for arg in node.args[1:2]:
                if isinstance(arg, ast.Constant) and arg.value in SEALED_NAMES:
                    bad.append(f"line {node.lineno}: {node.func.id}(..., {arg.value!r})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("layout"):
            bad += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in SEALED_NAMES]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SEALED_NAMES:
            bad.append(f"line {node.lineno}: string {node.value!r}")
    return bad


def kit_modules_outside_mask_rooms() -> list[Path]:
    skip = {".venv", "tests", ".git", "build", "paper"} | set(MASK_ROOMS)
    out = []
    for f in sorted(REPO_ROOT.rglob("*.py")):
        rel = f.relative_to(REPO_ROOT).parts
        if rel[0] in skip or any(p.startswith(".") for p in rel):
            continue
        out.append(f)
    return out + sorted((REPO_ROOT / "paper").rglob("*.py"))


def test_no_module_outside_data_and_eval_touches_sealed_internals():
    files = kit_modules_outside_mask_rooms()
    assert any(f.parent.name == "jobs" for f in files) and any(f.parent.name == "subspace" for f in files)
    found = {str(f.relative_to(REPO_ROOT)): private_mask_access(f.read_text()) for f in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_static_check_flags_planted_private_access():
    assert private_mask_access("def f(m):\n    return m._array\n")
    assert private_mask_access("def f(m):\n    return getattr(m, '_labels')\n")
    assert private_mask_access("from covtoken.data.layout import _VAULT\n")
    assert private_mask_access("import covtoken.data.layout as L\nx = L._VAULT\n")
    assert private_mask_access("import covtoken.data.layout as L\nf = getattr(L, '_open')\n")
    assert not private_mask_access("def f(m):\n    return m.shape, getattr(m, 'source')\n")


def test_sealed_mask_has_no_reachable_pixels(setting):
    import copy
    import pickle

    _, data, *_ = setting
    mask = next(iter(data.masks.values()))
    for name in ("_array", "_labels", "__dict__"):
        with pytest.raises(AttributeError):
            getattr(mask, name)
    assert set(type(mask).__slots__) == {"source", "_shape", "__weakref__"}
    with pytest.raises(LabelLeakError):
        pickle.dumps(mask)
    with pytest.raises(LabelLeakError):
        copy.deepcopy(mask)


# ------------------------------------------------------------------------------------------------
# 3-D LeJEPA pretraining (issue 12): the same check on the weights, and it sees the training patients only.
def _pretrain3d_arrays(splits, leak: bool = False):
    from covtoken.arch.lejepa3d import LeJEPA3DConfig, pretrain_volumes

    cfg = LeJEPA3DConfig(steps=2, batch_size=2, views=2, checkpoint_every=2, monitor_volumes=2)

    def arrays(d: LoadedDataset, work: Path) -> dict[str, np.ndarray]:
        if leak:  # the peek: a stage that lets the masks move the pixels it trains on
            from covtoken.eval.labels import token_lesion_fraction

            frac = token_lesion_fraction(d.masks, [it.image_id for it in d.items], (4, 4))
            d = LoadedDataset([replace(it, image=it.image + 1e-3 * float(frac[i].sum()))
                               for i, it in enumerate(d.items)], d.masks, d.provenance)
        res = pretrain_volumes(d, splits, cfg, seed=0, out_dir=work)
        assert res.volume_ids == sorted(splits["train"])  # never a validation or test patient's volume
        return {f"w:{k}": v.numpy() for k, v in res.model.state_dict().items()}
    return arrays


def test_3d_pretraining_is_invariant_to_masks_and_sees_training_patients_only(arch_setting, tmp_path):
    data, _ = arch_setting
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                            seed=0)
    assert_stage_invariant(_pretrain3d_arrays(splits), data, tmp_path)


def test_3d_pretraining_planted_leak_is_caught(arch_setting, tmp_path):
    data, _ = arch_setting
    splits = split_patients([it.patient_id for it in data.items], fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                            seed=0)
    with pytest.raises(AssertionError, match="changed with permuted masks"):
        assert_stage_invariant(_pretrain3d_arrays(splits, leak=True), data, tmp_path)
