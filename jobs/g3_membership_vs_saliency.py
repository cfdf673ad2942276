# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G3 - at equal keep rates, membership pruning misses fewer small lesions than CLS-attention (saliency) pruning.

Every image keeps ceil(rho * N) of its N patch tokens, for each keep rate rho of the locked grid. Membership
keeps the tokens with the highest label-free subspace score (G1's constructions, fitted on training patients'
tokens of every block); saliency keeps the tokens the CLS query attends to most (head-averaged CLS attention of
one block, recomputed from the block's own q/k; EViT-style). A lesion is missed when none of the tokens it
touches is kept; "small" means an area of at most the locked number of tokens. Each arm's block (and
construction) is chosen on validation patients; on test patients both arms, and the random-keep expectation,
are compared with one paired patient-clustered bootstrap at every keep rate. The gate is judged at the locked
primary keep rate on the difference saliency minus membership.

Run locally (embedded default: CT phantoms + the tiny ViT, 2 CPU cores, under a minute):
    covtoken run jobs/g3_membership_vs_saliency.py --smoke
    python jobs/g3_membership_vs_saliency.py --smoke --results results/local

On real data and a real backbone (as an HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g3_membership_vs_saliency.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --dataset hf://datasets/org/lidc-idri-covtoken@<sha> --backbone meddinov3-vitb16-ct --device cuda
    hf jobs run --flavor a10g-small --timeout 2h -s HF_TOKEN ...   (printed exactly by `covtoken submit --dry-run`)
Use a registers-aware backbone for a fair saliency arm (meddinov3-vitb16-ct, dinov2-base-reg).

Calibration (proposes thresholds; never judged):
    python jobs/g3_membership_vs_saliency.py --smoke --calibration --results results/calibration-G3
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from covtoken.eval.gate_g3 import evaluate_g3, g3_inputs  # noqa: F401  (evaluate_g3: moved to covtoken.eval)
from covtoken.runner import JobConfig, job_main, load_gate_dataset

log = logging.getLogger("covtoken.g3")


@dataclass(frozen=True)
class G3Config(JobConfig):
    dataset: str = field(default="phantom-ct", metadata={"help": "dataset name (see covtoken.data.catalog)"})
    work_dir: str = field(default=".cache/covtoken", metadata={"help": "token banks (resumable)"})
    constructions: tuple = field(default=("A_gauss", "A_knn", "B_pca"), metadata={"help": "comma-separated"})


@dataclass(frozen=True)
class LabelFree:
    """What G3 computes before masks are opened (rows of ``membership``/``saliency`` = val then test images).

    Attributes:
        bank: the token bank of every block.
        rows: split name -> image rows of the bank.
        membership: ``"<construction>@<block>"`` -> ``(n_val + n_test, N)`` subspace scores.
        saliency: block -> ``(n_val + n_test, N)`` head-averaged CLS attention.
        high_norm: block -> ``(n_val + n_test, N)`` artefact-like high-norm token flags.
    """

    bank: object
    rows: dict
    membership: dict
    saliency: dict
    high_norm: dict


def main(argv: list[str] | None = None) -> int:
    return job_main(G3Config, run_g3, script="jobs/g3_membership_vs_saliency.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-ct", "backbone": "tiny-vit", "device": "cpu"})


def label_free_stage(data, bb, splits, P, cfg, bank_dir, on_shard=None) -> LabelFree:  # noqa: ANN001 (types live in the packages)
    """Everything G3 computes before masks are opened: token bank, subspace scores, CLS attention, norm flags.

    It receives the loaded dataset as the job has it (masks included) and must not depend on the masks;
    ``tests/test_label_leak.py`` runs it with permuted and zeroed masks and requires bit-identical output.
    """
    from covtoken.backbone.attention import cls_attention_maps, high_norm_tokens
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.subspace import score_blocks

    blocks = list(range(bb.spec.depth))
    bank = TokenBank.build(bank_dir, bb, data.items, blocks=blocks, final_norm=bool(P["final_norm"]),
                           batch_size=cfg.batch_size, on_shard=on_shard)
    rows = bank.split_rows(splits)
    scored = np.concatenate([rows["val"], rows["test"]])
    n_tok = bank.grid[0] * bank.grid[1]
    flat = score_blocks(bank.tokens, blocks=blocks, constructions=list(cfg.constructions), fit_rows=rows["train"],
                        score_rows=scored, params=dict(P["construction_params"]), seed=cfg.seed,
                        max_fit_tokens=int(P["max_fit_tokens"]))
    membership = {arm: s.reshape(len(scored), n_tok) for arm, s in flat.items()}
    saliency = cls_attention_maps(bb, [data.items[r].image for r in scored], blocks, batch_size=cfg.batch_size)
    high_norm = {b: high_norm_tokens(bank.tokens(b, scored), factor=float(P["high_norm_factor"])) for b in blocks}
    return LabelFree(bank, rows, membership, saliency, high_norm)


def run_g3(cfg: G3Config, *, command: list[str]) -> int:
    from covtoken.backbone.frozen import load_backbone
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.backbone.registry import get_spec
    from covtoken.data.catalog import is_embedded
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.labels import lesion_components
    from covtoken.eval.lesion_miss import LesionSet
    from covtoken.gate.keep import keep_count, topk_keep
    from covtoken.runner import Run, stage

    spec = get_spec(cfg.backbone)  # an unknown backbone fails here, before any data is touched
    run = Run.for_gate("G3", cfg, command=command)
    P = run.parameters
    if not (is_embedded(cfg.dataset) and cfg.backbone == "tiny-vit") and spec.num_registers == 0:
        log.warning("%s has no register tokens: its CLS attention may be dominated by high-norm artefact tokens "
                    "(Darcet et al. 2024); use a registers-aware backbone for a fair saliency arm", cfg.backbone)

    data = load_gate_dataset(cfg, P, dataset=cfg.dataset)
    splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, data.items)
    with stage("backbone", backbone=cfg.backbone):
        bb = load_backbone(cfg.backbone, weights=cfg.weights, revision=cfg.revision, device=cfg.device)
    bank_dir = TokenBank.folder_for(cfg.work_dir, dataset=data.provenance["id"], revision=data.provenance["revision"],
                                    backbone=bb, items=data.items, blocks=range(bb.spec.depth),
                                    final_norm=bool(P["final_norm"]))
    with stage("label_free", images=len(data.items), blocks=bb.spec.depth):
        lf = label_free_stage(data, bb, splits, P, cfg, bank_dir,
                              on_shard=run.sync_token_bank(bank_dir))
    n_tok = lf.bank.grid[0] * lf.bank.grid[1]

    # Masks are opened only here, inside covtoken.eval, after every score and attention map exists.
    with stage("evaluate"):
        lesions = {}
        for sp in ("val", "test"):
            r = lf.rows[sp]
            comps = lesion_components(data.masks, [lf.bank.image_ids[i] for i in r], lf.bank.grid)
            lesions[sp] = LesionSet.from_components(comps, [lf.bank.patient_ids[i] for i in r])
        ev = run.evaluate("g3.miss", *g3_inputs(lf, lesions, P, n_tok, cfg.seed))  # the audit recomputes it
        metrics, selection, curve = ev.metrics, ev.extras["selection"], ev.extras["curve"]

    sal_block = int(selection["saliency_arm"].rpartition("@")[2])
    n_val = len(lf.rows["val"])
    kept = topk_keep(lf.saliency[sal_block][n_val:], keep_count(n_tok, float(P["primary_keep_rate"])))
    flags = lf.high_norm[sal_block][n_val:]
    diagnostics = {"block": sal_block, "high_norm_factor": float(P["high_norm_factor"]),
                   "high_norm_share_all_tokens": float(flags.mean()),
                   "high_norm_share_of_saliency_kept": float(flags[kept].mean()),
                   "num_registers": spec.num_registers,
                   "note": "share of test tokens whose norm exceeds factor x the image median; a saliency arm that "
                           "keeps mostly such tokens is looking at artefacts, not anatomy"}
    backbone_prov = bb.provenance(blocks=list(range(bb.spec.depth)), final_norm=bool(P["final_norm"]))
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    manifest = split.to_dict()
    dataset_prov = split.dataset_provenance(data.provenance, roles={"fit": "train", "select": "val", "judge": "test"},
                                            calibration=cfg.calibration)
    if cfg.calibration:
        path = run.write_calibration(metrics=metrics, backbone=backbone_prov, dataset=dataset_prov)
        log.info("calibration metrics written to %s", path)
        return 0
    run.artefacts.json("miss_curves.json", curve, description="test small-lesion miss rate per keep rate and arm, with CIs")
    run.artefacts.json("selection.json", selection, description="arms chosen on validation, and how")
    run.artefacts.json("saliency_diagnostics.json", diagnostics, description="high-norm token share of the saliency arm")
    run.artefacts.json("splits.json", manifest, description="patient membership of each split, with its digest")
    run.notes.append(f"membership {selection['membership_arm']} vs saliency {selection['saliency_arm']} "
                     f"(chosen on validation); high-norm share of saliency-kept tokens "
                     f"{diagnostics['high_norm_share_of_saliency_kept']:.3f}")
    path = run.finish(metrics=metrics, backbone=backbone_prov, dataset=dataset_prov)
    log.info("record: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
