# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G4 - a conformal retention certificate keeps the lesion tokens at exactly the promised rate.

A label-free membership score (the Mahalanobis density of training patients' tokens at the locked block) is
thresholded per token. Two certificates are calibrated on calibration patients (the patient is the exchangeable
unit) and reported on test patients: conformal risk control of the fraction of each patient's lesion tokens
dropped (level alpha, bound B = 1, the exact threshold over the calibration scores), and the split-conformal
"all lesion tokens kept" threshold. Their validity is checked over many random calibration/test splits of the
pooled patients: mean test coverage inside the exact band passes, below it is a violation, far above it a loose
certificate. The kept-token fraction is the price. The decision is judged under the locked thresholds.

Run locally (embedded default: CT phantoms + the tiny ViT, 2 CPU cores, about 20 s):
    covtoken run jobs/g4_conformal_retention.py --smoke
    python jobs/g4_conformal_retention.py --smoke --results results/local      # the same, without the launcher

On real data and a real backbone (as an HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g4_conformal_retention.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --dataset hf://datasets/org/lidc-idri-covtoken@<sha> --backbone meddinov3-vitb16-ct --device cuda
    hf jobs run --flavor a10g-small --timeout 2h -s HF_TOKEN ...   (printed exactly by `covtoken submit --dry-run`)

Calibration (proposes thresholds; never judged):
    python jobs/g4_conformal_retention.py --smoke --calibration --results results/calibration-G4
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from covtoken.runner import JobConfig, job_main, load_gate_dataset

log = logging.getLogger("covtoken.g4")


@dataclass(frozen=True)
class G4Config(JobConfig):
    dataset: str = field(default="phantom-ct", metadata={"help": "dataset name (see covtoken.data.catalog)"})
    work_dir: str = field(default=".cache/covtoken", metadata={"help": "token banks (resumable)"})


def main(argv: list[str] | None = None) -> int:
    return job_main(G4Config, run_g4, script="jobs/g4_conformal_retention.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-ct", "backbone": "tiny-vit", "device": "cpu"})


def label_free_stage(data, bb, splits, P, cfg, bank_dir, on_shard=None):  # noqa: ANN001 (types live in the packages)
    """Everything G4 computes before masks are opened: token bank, membership score fit and scores.

    It receives the loaded dataset as the job has it (masks included) and must not depend on the masks;
    ``tests/test_label_leak.py`` runs it with permuted and zeroed masks and requires bit-identical output.

    Returns:
        ``(bank, rows, scores)``: the token bank, image rows per split, and ``(n_pool_images, N)`` scores of the
        calibration then test images (rows ``rows["calib"]`` then ``rows["test"]``).
    """
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.subspace import build_scorer, fit_subsample

    block = int(P["score_block"])
    bank = TokenBank.build(bank_dir, bb, data.items, blocks=list(range(bb.spec.depth)), final_norm=bool(P["final_norm"]),
                           batch_size=cfg.batch_size, on_shard=on_shard)
    rows = bank.split_rows(splits)
    fit = bank.tokens(block, rows["train"]).reshape(-1, bb.spec.width)
    fit = fit[fit_subsample(fit.shape[0], int(P["max_fit_tokens"]), cfg.seed + block)]
    scorer = build_scorer(P["score_construction"], dict(P["construction_params"])).fit(fit)
    pool = np.concatenate([rows["calib"], rows["test"]])
    query = bank.tokens(block, pool)
    scores = scorer.score(query.reshape(-1, query.shape[-1])).reshape(query.shape[0], query.shape[1])
    return bank, rows, scores


def run_g4(cfg: G4Config, *, command: list[str]) -> int:
    from covtoken.arch.conformal import RetentionData
    from covtoken.backbone.frozen import load_backbone
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.backbone.registry import get_spec
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.gate_arch import g4_inputs
    from covtoken.eval.labels import token_lesion_fraction
    from covtoken.runner import Run, stage

    spec = get_spec(cfg.backbone)  # an unknown backbone fails here, before any data is touched
    run = Run.for_gate("G4", cfg, command=command)
    P = run.parameters
    if not 0 <= int(P["score_block"]) < spec.depth:
        raise ValueError(f"locked score_block {P['score_block']} outside the {spec.depth} blocks of {cfg.backbone}")
    if P["calibrate_on"] != "unit":
        log.warning("calibrate_on=%r: the certificate is NOT calibrated on the exchangeable unit", P["calibrate_on"])

    data = load_gate_dataset(cfg, P, dataset=cfg.dataset)
    splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, data.items)
    with stage("backbone", backbone=cfg.backbone):
        bb = load_backbone(cfg.backbone, weights=cfg.weights, revision=cfg.revision, device=cfg.device)
    bank_dir = TokenBank.folder_for(cfg.work_dir, dataset=data.provenance["id"], revision=data.provenance["revision"],
                                    backbone=bb, items=data.items, blocks=range(bb.spec.depth), final_norm=bool(P["final_norm"]))
    with stage("label_free_scores", images=len(data.items), block=int(P["score_block"])):
        bank, rows, scores = label_free_stage(data, bb, splits, P, cfg, bank_dir,
                                              on_shard=run.sync_token_bank(bank_dir))

    # Masks are opened only here, inside covtoken.eval, after every score exists.
    pool = np.concatenate([rows["calib"], rows["test"]])
    frac = token_lesion_fraction(data.masks, [bank.image_ids[i] for i in pool], bank.grid)
    patients = np.array(bank.patient_ids)[pool]
    units = RetentionData.from_tokens(scores, frac > float(P["lesion_token_min_fraction"]), patients)
    cal_units = np.flatnonzero(np.isin(units.unit_ids, list(splits["calib"])))
    test_units = np.flatnonzero(np.isin(units.unit_ids, list(splits["test"])))
    n_free = len(set(patients)) - units.n_units
    with stage("certificates", calibration_patients=int(cal_units.size), test_patients=int(test_units.size)):
        res = run.evaluate("g4.certificate", *g4_inputs(units, cal_units=cal_units, test_units=test_units, P=P,
                                                        seed=cfg.seed))  # the audit recomputes it from the inputs
    res_details = res.extras["details"]

    backbone_prov = bb.provenance(blocks=[int(P["score_block"])], final_norm=bool(P["final_norm"]))
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    manifest = split.to_dict()
    dataset_prov = split.dataset_provenance(data.provenance, roles={"fit": "train", "calibrate": "calib", "judge": "test"},
                                            calibration=cfg.calibration,
                                            patients_without_lesion_tokens=int(n_free))
    if cfg.calibration:
        path = run.write_calibration(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
        log.info("calibration metrics written to %s", path)
        return 0
    run.artefacts.json("certificate.json", res_details,
                       description="thresholds, bands, Beta law, flags and the per-split test coverages and kept fractions")
    run.artefacts.json("splits.json", manifest, description="patient membership of each split, with its digest")
    for key, name in (("crc", "conformal risk control"), ("allkept", "all-kept split conformal")):
        run.notes.append(f"{name}: {res_details['flags'][key]} (band {res_details['bands'][key]})")
    if n_free:
        run.notes.append(f"{n_free} pooled patient(s) without lesion tokens are outside the certificate")
    path = run.finish(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
    log.info("record: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
