# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G5 - lesion-routed depth: fewer MACs without losing small lesions.

Every token runs blocks 0..k; a label-free router (the Mahalanobis density of training patients' block-k tokens)
keeps the top fraction f of patch tokens per image, which go with the CLS token and any registers through blocks
k+1..L-1, while the rest exit with their block-k representation. MACs are counted analytically (12 N d^2 + 2 N^2 d
per block, patch embedding and router included) and checked against the matmuls the routed forward actually runs;
wall-clock is measured against the full forward in the same run. On held-out patients: the fraction of small
lesions with at least one token routed through all blocks (patient-clustered CI), against routing the same
number of tokens at random, and a MACs-vs-sensitivity curve over (k, f). Judged under the locked thresholds at the
locked operating point.

Run locally (embedded default: CT phantoms + the tiny ViT, 2 CPU cores, about 20 s):
    covtoken run jobs/g5_routed_depth.py --smoke
    python jobs/g5_routed_depth.py --smoke --results results/local      # the same, without the launcher

On real data and a real backbone (as an HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g5_routed_depth.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --dataset hf://datasets/org/lidc-idri-covtoken@<sha> --backbone meddinov3-vitb16-ct --device cuda
    hf jobs run --flavor a10g-small --timeout 2h -s HF_TOKEN ...   (printed exactly by `covtoken submit --dry-run`)

Calibration (proposes thresholds; never judged):
    python jobs/g5_routed_depth.py --smoke --calibration --results results/calibration-G5
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from covtoken.runner import JobConfig, job_main, load_gate_dataset

log = logging.getLogger("covtoken.g5")


@dataclass(frozen=True)
class G5Config(JobConfig):
    dataset: str = field(default="phantom-ct", metadata={"help": "dataset name (see covtoken.data.catalog)"})
    work_dir: str = field(default=".cache/covtoken", metadata={"help": "token banks (resumable)"})


def main(argv: list[str] | None = None) -> int:
    return job_main(G5Config, run_g5, script="jobs/g5_routed_depth.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-ct", "backbone": "tiny-vit", "device": "cpu"})


def label_free_stage(data, bb, splits, P, cfg, bank_dir, on_shard=None):  # noqa: ANN001 (types live in the packages)
    """Everything G5 computes before masks are opened: bank, routers, keep sets, the routed forward, MAC counts.

    It receives the loaded dataset as the job has it (masks included) and must not depend on the masks;
    ``tests/test_label_leak.py`` runs it with permuted and zeroed masks and requires bit-identical output.

    Returns:
        ``(bank, rows, scores, routed)``: the token bank; image rows per split; ``{k: (n_test_images, N)}`` router
        scores of test tokens at every candidate exit block k; and for the locked operating point the
        :class:`~covtoken.arch.routed_depth.RoutedDepth` (``"model"``), its keep sets ``"kept"``
        ``(n_test_images, K)`` from the routed forward, and ``"macs"``: analytic and directly counted MACs.
    """
    from covtoken.arch.flops import MacCounter
    from covtoken.arch.routed_depth import RoutedDepth, make_router
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.subspace import build_scorer, fit_subsample

    depth = bb.spec.depth
    bank = TokenBank.build(bank_dir, bb, data.items, blocks=list(range(depth)), final_norm=False, batch_size=cfg.batch_size, on_shard=on_shard)
    rows = bank.split_rows(splits)
    scores, scorers = {}, {}
    for k in range(depth - 1):
        fit = bank.tokens(k, rows["train"]).reshape(-1, bb.spec.width)
        fit = fit[fit_subsample(fit.shape[0], int(P["max_fit_tokens"]), cfg.seed + k)]
        scorers[k] = build_scorer(P["router_construction"], dict(P["construction_params"])).fit(fit)
        query = bank.tokens(k, rows["test"])
        scores[k] = scorers[k].score(query.reshape(-1, query.shape[-1])).reshape(query.shape[:2])
    k_op = int(P["exit_after"])
    rd = RoutedDepth(bb.model, exit_after=k_op, keep=float(P["keep_fraction"]), router=make_router(scorers[k_op]).to(bb.device))
    test_items = [data.items[i] for i in rows["test"]]
    kept = []
    for start in range(0, len(test_items), cfg.batch_size):
        pixels = bb.preprocess([it.image for it in test_items[start:start + cfg.batch_size]])
        kept.append(rd.routed(pixels).kept.cpu().numpy())
    probe = bb.preprocess([it.image for it in test_items[:int(P["timing_batch"])]])
    with MacCounter() as full_count:
        rd.full(probe)
    with MacCounter() as routed_count:
        rd.routed(probe)
    b = int(probe.shape[0])
    macs = {"batch": b, "full_analytic": rd.full_macs(b), "routed_analytic": rd.routed_macs(b),
            "full_counted": full_count.macs, "routed_counted": routed_count.macs,
            "routed_counted_by_op": routed_count.by_op}
    return bank, rows, scores, {"model": rd, "kept": np.concatenate(kept), "macs": macs, "probe": probe}


def run_g5(cfg: G5Config, *, command: list[str]) -> int:
    from covtoken.arch.routed_depth import time_forwards, top_keep
    from covtoken.backbone.frozen import load_backbone
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.backbone.registry import get_spec
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.gate_arch import g5_inputs
    from covtoken.eval.labels import lesion_components
    from covtoken.runner import Run, stage

    spec = get_spec(cfg.backbone)  # an unknown backbone fails here, before any data is touched
    run = Run.for_gate("G5", cfg, command=command)
    P = run.parameters
    if not 0 <= int(P["exit_after"]) < spec.depth - 1:
        raise ValueError(f"locked exit_after {P['exit_after']} must lie in [0, {spec.depth - 1}) for {cfg.backbone}")

    data = load_gate_dataset(cfg, P, dataset=cfg.dataset)
    splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, data.items)
    with stage("backbone", backbone=cfg.backbone):
        bb = load_backbone(cfg.backbone, weights=cfg.weights, revision=cfg.revision, device=cfg.device)
    bank_dir = TokenBank.folder_for(cfg.work_dir, dataset=data.provenance["id"], revision=data.provenance["revision"],
                                    backbone=bb, items=data.items, blocks=range(bb.spec.depth), final_norm=False)
    with stage("label_free_routing", images=len(data.items), exit_after=int(P["exit_after"])):
        bank, rows, scores, routed = label_free_stage(data, bb, splits, P, cfg, bank_dir,
                                                      on_shard=run.sync_token_bank(bank_dir))
    with stage("wallclock", batch=int(routed["probe"].shape[0]), repeats=int(P["timing_repeats"])):
        timing = time_forwards(routed["model"], routed["probe"], repeats=int(P["timing_repeats"]))
    rd = routed["model"]
    bank_kept = top_keep(scores[rd.exit_after], rd.n_keep)

    # Masks are opened only here, inside covtoken.eval, after every keep set exists.
    test_ids = [bank.image_ids[i] for i in rows["test"]]
    components = lesion_components(data.masks, test_ids, bank.grid)
    lesions = [[c["tokens"] for c in comps] for comps in components]
    areas = [[c["area_tokens"] for c in comps] for comps in components]
    patients = np.array(bank.patient_ids)[rows["test"]]
    with stage("evaluate"):  # through the recipe the audit recomputes from the stored inputs
        res = run.evaluate("g5.routing", *g5_inputs(
            rd=rd, kept=routed["kept"], bank_kept=bank_kept, scores=scores, lesions=lesions, areas=areas,
            patients=patients, patient_order=sorted(splits["test"]), macs=routed["macs"], timing=timing, P=P,
            device=str(bb.device), seed=cfg.seed))
    res_curve, res_notes = res.extras["curve"], res.extras["notes"]

    backbone_prov = bb.provenance(blocks=sorted(scores), final_norm=False)
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    manifest = split.to_dict()
    dataset_prov = split.dataset_provenance(data.provenance, roles={"fit": "train", "judge": "test"},
                                            calibration=cfg.calibration)
    if cfg.calibration:
        path = run.write_calibration(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
        log.info("calibration metrics written to %s", path)
        return 0
    run.artefacts.json("curve.json", res_curve, description="MACs ratio vs small-lesion sensitivity over (exit block, "
                       "keep fraction), with patient-clustered CIs and the random-routing baseline")
    run.artefacts.json("macs.json", {**routed["macs"], "timing": timing},
                       description="analytic vs directly counted MACs of one batch, and wall-clock of both forwards")
    run.artefacts.json("splits.json", manifest, description="patient membership of each split, with its digest")
    run.notes.extend(res_notes)
    path = run.finish(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
    log.info("record: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
