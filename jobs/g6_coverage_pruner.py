# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G6 - the negative result: a coverage-constrained token pruner does not protect small lesions.

The hypothesis under test is that a coverage constraint protects small lesions. A pruner with one
hard-concrete gate per token (Louizos et al. 2018) minimises its expected kept fraction subject to
F(kept) >= c F(all), F the coding rate of the L2-normalised tokens, with projected dual ascent on the
Lagrange multiplier; it is trained per test image, on the tokens of the block that membership pruning uses,
with no label in sight. Membership pruning (G1's label-free subspace score, arm chosen on validation) then
keeps exactly as many tokens in each image as the pruner kept. (C1) compares small-lesion recall at these
equal keep counts with a paired patient-clustered bootstrap against a non-inferiority margin; (C2) tests the
mechanism: removing every lesion token of an image must lower F by at least the slack 1 - c for the
constraint to hold on to lesions. RankMe, coding rate and energy are all reported for lesion and random
token removal. The gate is expected to come out `fail`; NEGATIVE_RESULT.md then records it.

Run locally (embedded default: CT phantoms + the tiny ViT, 2 CPU cores, under a minute):
    covtoken run jobs/g6_coverage_pruner.py --smoke
    python jobs/g6_coverage_pruner.py --smoke --results results/local

On real data and a real backbone (as an HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g6_coverage_pruner.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --dataset hf://datasets/org/lidc-idri-covtoken@<sha> --backbone meddinov3-vitb16-ct --device cuda
    hf jobs run --flavor a10g-small --timeout 2h -s HF_TOKEN ...   (printed exactly by `covtoken submit --dry-run`)

Calibration (every G6 criterion is prespecified; a calibration run only checks the flow on other patients):
    python jobs/g6_coverage_pruner.py --smoke --calibration --results results/calibration-G6
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from covtoken.runner import JobConfig, job_main, load_gate_dataset

log = logging.getLogger("covtoken.g6")
from covtoken.eval.gate_g6 import FUNCTIONAL_PARAMS, evaluate_g6, g6_inputs  # noqa: E402,F401  (moved to covtoken.eval)


@dataclass(frozen=True)
class G6Config(JobConfig):
    dataset: str = field(default="phantom-ct", metadata={"help": "dataset name (see covtoken.data.catalog)"})
    work_dir: str = field(default=".cache/covtoken", metadata={"help": "token banks (resumable)"})
    constructions: tuple = field(default=("A_gauss", "A_knn", "B_pca"), metadata={"help": "comma-separated"})


def main(argv: list[str] | None = None) -> int:
    return job_main(G6Config, run_g6, script="jobs/g6_coverage_pruner.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-ct", "backbone": "tiny-vit", "device": "cpu"})


def label_free_stage(data, bb, splits, P, cfg, bank_dir, on_shard=None) -> tuple:  # noqa: ANN001 (types live in the packages)
    """Everything G6 computes before masks are opened: token bank and subspace scores of val + test images.

    It must not depend on the masks (``tests/test_label_leak.py`` checks it with permuted and zeroed masks).

    Returns:
        ``(bank, rows, membership)``; ``membership[arm]`` is ``(n_val + n_test, N)``.
    """
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
    return bank, rows, {arm: s.reshape(len(scored), n_tok) for arm, s in flat.items()}


def prune_stage(tokens: np.ndarray, P, seed: int, device: str = "cpu"):  # noqa: ANN001, ANN201
    """The coverage-constrained pruner on ``(B, N, d)`` tokens: label-free by construction (tokens in, keep sets out)."""
    from covtoken.gate.pruner import PrunerConfig, fit_pruner

    return fit_pruner(tokens, PrunerConfig(**dict(P["pruner"]), seed=seed), device=device)


def explain(metrics: dict, arm: str, P) -> list[str]:  # noqa: ANN001
    """The record's notes: what the numbers say about the hypothesis, for NEGATIVE_RESULT.md."""
    def v(name: str) -> str:
        m = metrics[name]
        return f"{m['value']:.3f}" + ("" if m["ci"] is None else f" [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]")

    def pct(name: str) -> str:
        return f"{100 * metrics[name]['value']:.1f}%"

    pc = dict(P["pruner"])
    slack = 1.0 - float(pc["target"])
    restore = metrics["restore_gain_over_slack"]["value"]
    incentive = ("below 1, the constraint gives the optimiser no reason to keep them" if restore < 1 else
                 "above 1, the constraint does reward keeping them")
    return [
        f"Small-lesion recall at equal per-image keep counts (pruner trained on the tokens of block "
        f"{arm.rpartition('@')[2]}, the block of the validation-selected membership arm {arm}; mean keep fraction "
        f"{metrics['pruner_keep_fraction']['value']:.3f}): "
        f"pruner {v('small_recall_pruner')}, membership {v('small_recall_membership')}, random keep "
        f"{v('small_recall_random')}; difference pruner - membership {v('delta_small_recall')} against a "
        f"non-inferiority margin of {float(P['noninferiority_margin']):.2f}.",
        f"Mechanism: removing every lesion token of an image lowers the coding rate by {pct('lesion_drop_coding_rate')}, "
        f"RankMe by {pct('lesion_drop_rankme')} and the energy by {pct('lesion_drop_energy')} (medians); as many random "
        f"tokens: {pct('random_drop_coding_rate')}, {pct('random_drop_rankme')}, {pct('random_drop_energy')}. The "
        f"constraint on the {pc['functional']} has slack {100 * slack:.1f}% (lesion drop / slack "
        f"{v('lesion_drop_over_slack')}). Restoring the "
        f"lesion tokens to the pruner's keep set would raise F by {v('restore_gain_over_slack')} of the slack: "
        f"{incentive}.",
        f"The pruner's keep sets met F(kept) >= {pc['target']} F(all) on a fraction "
        f"{metrics['constraint_met_fraction']['value']:.3f} of the test images ("
        + metrics["constraint_met_fraction"]["description"].rpartition("(")[2].rstrip(")") + ").",
    ]


def run_g6(cfg: G6Config, *, command: list[str]) -> int:
    from covtoken.backbone.frozen import load_backbone
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.backbone.registry import get_spec
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.labels import lesion_components
    from covtoken.eval.lesion_miss import LesionSet, best_rank, select_lowest_miss
    from covtoken.gate.keep import keep_count, token_ranks
    from covtoken.runner import Run, stage

    get_spec(cfg.backbone)  # an unknown backbone fails here, before any data is touched
    run = Run.for_gate("G6", cfg, command=command)
    P = run.parameters

    data = load_gate_dataset(cfg, P, dataset=cfg.dataset)
    splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, data.items)
    with stage("backbone", backbone=cfg.backbone):
        bb = load_backbone(cfg.backbone, weights=cfg.weights, revision=cfg.revision, device=cfg.device)
    bank_dir = TokenBank.folder_for(cfg.work_dir, dataset=data.provenance["id"], revision=data.provenance["revision"],
                                    backbone=bb, items=data.items, blocks=range(bb.spec.depth),
                                    final_norm=bool(P["final_norm"]))
    with stage("label_free", images=len(data.items), blocks=bb.spec.depth):
        bank, rows, membership = label_free_stage(data, bb, splits, P, cfg, bank_dir,
                                                  on_shard=run.sync_token_bank(bank_dir))
    n_tok = bank.grid[0] * bank.grid[1]
    n_val = len(rows["val"])
    small_max = float(P["small_max_area_tokens"])

    # Masks are opened only here, inside covtoken.eval, after every score exists.
    lesions = {}
    for sp in ("val", "test"):
        comps = lesion_components(data.masks, [bank.image_ids[i] for i in rows[sp]], bank.grid)
        lesions[sp] = LesionSet.from_components(comps, [bank.patient_ids[i] for i in rows[sp]])
    val_small = lesions["val"].select(lesions["val"].area <= small_max)
    arm, val_miss = select_lowest_miss({a: best_rank(token_ranks(s[:n_val]), val_small) for a, s in membership.items()},
                                       keep_count(n_tok, float(P["reference_keep_rate"])))
    block = int(arm.rpartition("@")[2])
    test_tokens = bank.tokens(block, rows["test"])
    with stage("prune", images=len(rows["test"]), block=block):
        pruned = prune_stage(test_tokens, P, cfg.seed, cfg.device)
    with stage("evaluate"):  # selection and test metrics through the recipe the audit recomputes
        ev = run.evaluate("g6.pruner", *g6_inputs(tokens=test_tokens, membership=membership, n_val=n_val,
                                                  pruned=pruned, lesions=lesions, arm=arm, P=P, seed=cfg.seed))
    metrics, per_image = ev.metrics, ev.extras["per_image"]

    backbone_prov = bb.provenance(blocks=list(range(bb.spec.depth)), final_norm=bool(P["final_norm"]))
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    manifest = split.to_dict()
    dataset_prov = split.dataset_provenance(data.provenance, roles={"fit": "train", "select": "val", "judge": "test"},
                                            calibration=cfg.calibration)
    if cfg.calibration:
        path = run.write_calibration(metrics=metrics, backbone=backbone_prov, dataset=dataset_prov)
        log.info("calibration metrics written to %s", path)
        return 0
    run.artefacts.json("pruner.json", {"history": pruned.history, "keep_fraction": pruned.keep_fraction.tolist(),
                                       "ratio": pruned.ratio.tolist(), "lambda": pruned.lam.tolist(),
                                       "repaired": pruned.repaired.tolist(), "block": block},
                       description="dual ascent log (lambda, slack, expected keep, gate entropy) and per-image results")
    run.artefacts.json("mechanism.json", per_image, description="per lesion image: functional drops and restore gain")
    run.artefacts.json("selection.json", {"membership_arm": arm, "val_small_miss_at_reference": val_miss,
                                          "reference_keep_rate": float(P["reference_keep_rate"]),
                                          "rule": "lowest validation small-lesion miss rate; ties -> lower block, then name"},
                       description="membership arm chosen on validation (the pruner uses its block)")
    run.artefacts.json("splits.json", manifest, description="patient membership of each split, with its digest")
    run.notes.extend(explain(metrics, arm, P))
    path = run.finish(metrics=metrics, backbone=backbone_prov, dataset=dataset_prov)
    log.info("record: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
