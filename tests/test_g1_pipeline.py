"""G1 end to end: phantoms, tiny ViT, token bank (resumable), evaluation that can fail, job config, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from covtoken.backbone.frozen import load_backbone
from covtoken.backbone.registry import UnknownBackboneError, get_spec
from covtoken.backbone.tokenbank import BankMismatchError, TokenBank
from covtoken.data.catalog import load_dataset
from covtoken.eval.labels import lesion_components, token_labels, token_lesion_fraction
from covtoken.eval.localisation import SplitScores, evaluate_g1
from covtoken.runner import ConfigError
from g1_helpers import copy_lock, load_job


def test_phantoms_are_deterministic_and_include_sub_token_lesions():
    a = load_dataset("phantom-ct", seed=5, n_patients=6, per_patient=3)
    b = load_dataset("phantom-ct", seed=5, n_patients=6, per_patient=3)
    c = load_dataset("phantom-ct", seed=6, n_patients=6, per_patient=3)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.items, b.items))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a.items, c.items))
    big = load_dataset("phantom-ct", seed=0, n_patients=20, per_patient=4)
    comps = lesion_components(big.masks, [it.image_id for it in big.items], (8, 8))
    areas = [c["area_tokens"] for per in comps for c in per]
    assert min(areas) <= 1.0 and max(areas) > 2.0, areas  # sub-token nodules and multi-token ones
    assert any(len(per) == 0 for per in comps)  # lesion-free slices exist
    for name in ("phantom-us", "phantom-derm"):
        d = load_dataset(name, seed=0, n_patients=3, per_patient=2)
        assert len({it.patient_id for it in d.items}) == 3
    with pytest.raises(KeyError, match="phantom-ct"):
        load_dataset("nope")


def test_tiny_vit_tokens_and_registry():
    bb = load_backbone("tiny-vit")
    items = load_dataset("phantom-ct", seed=0, n_patients=1, per_patient=2).items
    x = bb.preprocess([it.image for it in items])
    toks = bb.patch_tokens(x, [0, 5])
    assert toks[0].shape == (2, 64, 64)
    direct = bb.model.forward_features(x)  # CLS + patches after the final norm
    normed = bb.patch_tokens(x, [5], final_norm=True)[5]
    np.testing.assert_allclose(normed.numpy(), direct[:, 1:].numpy(), atol=1e-5)
    assert not np.allclose(toks[5].numpy(), normed.numpy())
    assert load_backbone("tiny-vit").weights_digest == bb.weights_digest  # fixed seed
    with pytest.raises(ValueError, match="outside"):
        bb.patch_tokens(x, [6])
    with pytest.raises(UnknownBackboneError, match="tiny-vit"):
        get_spec("resnet-9000")


def test_token_bank_resumes_after_interruption(tmp_path):
    items = load_dataset("phantom-ct", seed=0, n_patients=3, per_patient=3).items
    bb = load_backbone("tiny-vit")
    calls = []
    full = TokenBank.build(tmp_path / "ref", bb, items, blocks=[1, 3], shard_size=4)

    def boom(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the second shard
    with pytest.raises(KeyboardInterrupt):
        TokenBank.build(tmp_path / "bank", bb, items, blocks=[1, 3], shard_size=4, on_shard=boom)
    done = []
    bank = TokenBank.build(tmp_path / "bank", bb, items, blocks=[1, 3], shard_size=4, on_shard=done.append)
    assert len(done) == 1  # only the missing shard was extracted
    np.testing.assert_array_equal(bank.tokens(3), full.tokens(3))
    # a corrupted finished shard is detected and rebuilt
    f = tmp_path / "bank" / "shard-00000" / "block-01.npy"
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    bank = TokenBank.build(tmp_path / "bank", bb, items, blocks=[1, 3], shard_size=4)
    np.testing.assert_array_equal(bank.tokens(1), full.tokens(1))
    with pytest.raises(BankMismatchError, match="blocks"):
        TokenBank.build(tmp_path / "bank", bb, items, blocks=[2], shard_size=4)


def _constructed(final_better: bool, seed: int = 0):
    """Token scores where the mid-layer arm is (or is not) better than the final one, 20 patients per split."""
    rng = np.random.default_rng(seed)

    def split(n_pat: int) -> SplitScores:
        y = (rng.random(n_pat * 50) < 0.1).astype(np.int8)
        pats = np.repeat([f"p{i}" for i in range(n_pat)], 50)
        good = y * 2.0 + rng.standard_normal(y.size)
        weak = y * 0.3 + rng.standard_normal(y.size)
        mid, fin = (weak, good) if final_better else (good, weak)
        scores = {"A_gauss@0": mid, "A_gauss@1": fin}
        return SplitScores(scores, y, pats, np.arange(y.size).astype(str))
    val, test = split(20), split(20)
    base = {"bright": (rng.standard_normal(val.labels.size), rng.standard_normal(test.labels.size))}
    return evaluate_g1(val=val, test=test, constructions=["A_gauss"], mid_blocks=[0], final_block=1, baseline=base,
                       n_boot=300, ci_level=0.95, seed=0)


def test_g1_gate_fails_when_the_claim_is_false():
    from covtoken.lock import ThresholdLock, judge

    entry = ThresholdLock.load(REPO_ROOT / "configs" / "thresholds.lock.json").entry("G1/real")
    ok = _constructed(final_better=False)
    bad = _constructed(final_better=True)
    assert judge(entry.criteria, ok.metrics)[0] == "pass"
    decision, judged, _ = judge(entry.criteria, bad.metrics)
    assert decision == "fail"
    assert bad.metrics["delta_mid_final_auroc"]["ci"][1] < 0


def test_token_labels_rule():
    frac = np.array([0.0, 0.2, 0.5, 1.0])
    assert token_labels(frac, positive_min=0.5, negative_max=0.0).tolist() == [0, -1, 1, 1]
    with pytest.raises(ValueError):
        token_labels(frac, positive_min=0.2, negative_max=0.3)


def test_mask_fraction_is_area_average():
    d = load_dataset("phantom-ct", seed=1, n_patients=2, per_patient=2)
    frac = token_lesion_fraction(d.masks, [it.image_id for it in d.items], (8, 8))
    from covtoken.data.layout import SealedMask
    for i, it in enumerate(d.items):
        m = d.masks[it.image_id]._array.astype(float)  # the reference reads the private array directly
        ref = m.reshape(8, 16, 8, 16).mean(axis=(1, 3)).reshape(-1)
        np.testing.assert_allclose(frac[i], ref, atol=1e-6)
    assert isinstance(d.masks[d.items[0].image_id], SealedMask)


def test_job_config_layering_rejects_unknown_keys(tmp_path):
    job = load_job("g1_lesion_subspace")
    bad = tmp_path / "exp.json"
    bad.write_text(json.dumps({"backbone": "tiny-vit", "n_bootstrap": 5}))
    with pytest.raises(ConfigError, match="n_bootstrap"):
        job.main(["--config", str(bad), "--results", str(tmp_path / "r")])


def test_unknown_backbone_fails_before_anything_is_written(tmp_path):
    job = load_job("g1_lesion_subspace")
    with pytest.raises(UnknownBackboneError, match="tiny-vit"):
        job.main(["--backbone", "nope", "--results", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"),
                  "--lock", str(copy_lock(tmp_path))])
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))


@pytest.mark.slow
def test_covtoken_run_cli_end_to_end(tmp_path):
    """`covtoken run` (local backend) -> record fetched -> `covtoken audit` passes, as `make demo` does."""
    env = {**os.environ, "PYTHONPATH": ""}
    lock = copy_lock(tmp_path / "cfg")
    cli = [sys.executable, "-m", "covtoken.cli"]
    r = subprocess.run(cli + ["run", str(REPO_ROOT / "jobs" / "g1_lesion_subspace.py"), "--results",
                              str(tmp_path / "reports"), "--staging", str(tmp_path / "staging"), "--", "--smoke",
                              "--work-dir", str(tmp_path / "w"), "--lock", str(lock)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    records = list((tmp_path / "reports").glob("g1-*.json"))
    assert len(records) == 1
    a = subprocess.run(cli + ["audit", str(tmp_path / "reports"), "--lock", str(lock)], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert a.returncode == 0, a.stdout + a.stderr
    assert records[0].stem in (tmp_path / "reports" / "SUMMARY.md").read_text()


@pytest.mark.realdata
def test_g1_on_the_five_lidc_patients_stops_before_the_compute(realdata, tmp_path, capsys):
    """5 patients cannot fill every judged split with the minimum: exit 2, one line, no token bank, no record."""
    lock = copy_lock(tmp_path / "cfg")
    rc = load_job("g1_lesion_subspace").main(["--dataset", "lidc", "--data-root", str(realdata / "lidc_idri"),
                                              "--results", str(tmp_path / "r"), "--work-dir",
                                              str(tmp_path / "w"), "--lock", str(lock)])
    assert rc == 2
    assert "judged split" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert not list((tmp_path / "r").rglob("*.json"))


@pytest.mark.realdata
@pytest.mark.parametrize("dataset,folder", [("busi", "busi")])
def test_g1_sample_runs_on_real_files_are_audited(realdata, tmp_path, dataset, folder):
    """G1 through its job script on the real samples with the tiny ViT: a flow check on real files, judged under
    G1/sample (chosen from the facts, no flag), and the audit accepts it."""
    from covtoken.audit import audit_folder, render_summary

    lock = copy_lock(tmp_path / "cfg")
    job = load_job("g1_lesion_subspace")
    rc = job.main(["--dataset", dataset, "--data-root", str(realdata / folder), "--results",
                   str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "--lock", str(lock)])
    assert rc == 0
    (record,) = list((tmp_path / "r").glob("g1-*.json"))
    rec = json.loads(record.read_text())
    assert rec["evidence"] == "flow-check" and rec["lock"]["entry"] == "G1/sample"
    assert rec["provenance"]["dataset"]["revision"].startswith("sha256:")
    assert "intensity_baseline_auroc" in rec["metrics"]
    rep = audit_folder(tmp_path / "r", lock_path=lock, allow_unproven_prereg=True, allow_dirty=True)
    assert rep.ok, rep.all_problems()
    assert "flow-check" in render_summary(rep)


def test_job_refuses_a_tampered_lock(tmp_path):
    from covtoken.lock import LockError

    lock = copy_lock(tmp_path / "cfg")
    doc = json.loads(lock.read_text())
    doc["gates"]["G1"]["entries"]["embedded"]["criteria"][0]["threshold"] = 0.0
    lock.write_text(json.dumps(doc))
    job = load_job("g1_lesion_subspace")
    with pytest.raises(LockError, match="G1/entries/embedded/digest"):
        job.main(["--smoke", "--results", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "--lock", str(lock)])
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()  # refused before any work


def test_wheel_installs_only_the_covtoken_package(tmp_path):
    """No top-level `data`, `eval`, `gate`... in site-packages: the wheel holds one package, `covtoken`."""
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(REPO_ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = list(tmp_path.glob("covtoken-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"covtoken"}, tops
    for sub in ("subspace", "coverage", "gate", "arch", "backbone", "data", "eval", "paper"):
        assert f"covtoken/{sub}/__init__.py" in names
    assert "covtoken/configs/thresholds.lock.json" in names and "covtoken/configs/gate_record.schema.json" in names


@pytest.mark.slow
def test_submit_without_results_repo_runs_the_local_backend(tmp_path):
    """`covtoken submit` with no results repo configured is the local backend: same job, local results folder."""
    env = {k: v for k, v in os.environ.items() if k != "COVTOKEN_RESULTS_REPO"}
    lock = copy_lock(tmp_path / "cfg")
    r = subprocess.run([sys.executable, "-m", "covtoken.cli", "submit", str(REPO_ROOT / "jobs" / "g1_lesion_subspace.py"),
                        "--results", str(tmp_path / "reports"), "--", "--smoke", "--work-dir", str(tmp_path / "w"),
                        "--lock", str(lock)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (record,) = list((tmp_path / "reports").glob("g1-*.json"))
    rec = json.loads(record.read_text())
    assert rec["provenance"]["backend"]["name"] == "local" and rec["provenance"]["backend"]["job_id"] is None


def test_mid_layer_rule_from_the_lock():
    from covtoken.eval.localisation import mid_layer_blocks

    assert mid_layer_blocks("every block before the final one", 6) == [0, 1, 2, 3, 4]
    assert mid_layer_blocks({"first": 1, "last_before_final": 1}, 12) == list(range(1, 11))
    for bad in ({"first": 3, "last_before_final": 3}, {"first": 1, "last_before_final": 0}, "middle", {"first": 1}):
        with pytest.raises(ValueError, match="mid-layer rule"):
            mid_layer_blocks(bad, 6 if bad != {"first": 1, "last_before_final": 0} else 12)
    entry = __import__("covtoken.lock", fromlist=["ThresholdLock"]).ThresholdLock.load(
        REPO_ROOT / "configs" / "thresholds.lock.json").entry("G1/real")
    assert mid_layer_blocks(entry.parameters["mid_blocks"], 12) == list(range(1, 11))  # never the first or last block
