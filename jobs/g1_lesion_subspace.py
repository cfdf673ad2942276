# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G1 - a label-free subspace in mid-layer patch tokens localises lesions better than the final layer.

Density construction A (global Gaussian with Ledoit-Wolf shrinkage; kNN distance) and residual
construction B (energy off the top principal subspace) are fitted on the tokens of training patients of
every block, with no mask in sight, and score the tokens of validation and test patients. The mid-layer
arm with the best validation AUROC is compared on test patients with the final block of the same
construction (patient-clustered paired bootstrap); a trivial intensity baseline is reported beside it.
The decision is judged under the locked thresholds and written as a gate record.

Run locally (embedded default: CT phantoms + the tiny ViT, 2 CPU cores, about a minute):
    covtoken run jobs/g1_lesion_subspace.py --smoke
    python jobs/g1_lesion_subspace.py --smoke --results results/local        # the same, without the launcher

On real data and a real backbone (as an HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g1_lesion_subspace.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --dataset hf://datasets/org/lidc-idri-covtoken@<sha> --backbone meddinov3-vitb16-ct --device cuda
    hf jobs run --flavor a10g-small --timeout 2h -s HF_TOKEN ...   (printed exactly by `covtoken submit --dry-run`)

Calibration (proposes thresholds; never judged):
    python jobs/g1_lesion_subspace.py --smoke --calibration --results results/calibration
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covtoken.runner import JobConfig, job_main, load_gate_dataset


MIN_PATIENTS_FOR_CI = 10


@dataclass(frozen=True)
class G1Config(JobConfig):
    dataset: str = field(default="phantom-ct", metadata={"help": "dataset name or source (see covtoken.data.catalog)"})
    data_root: str | None = field(default=None, metadata={"help": "folder of a file-based dataset (busi, lidc)"})
    work_dir: str = field(default=".cache/covtoken", metadata={"help": "token banks (resumable)"})
    constructions: tuple = field(default=("A_gauss", "A_knn", "B_pca"), metadata={"help": "comma-separated"})


def main(argv: list[str] | None = None) -> int:
    return job_main(G1Config, run_g1, script="jobs/g1_lesion_subspace.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-ct", "backbone": "tiny-vit", "device": "cpu"})


def label_free_stage(data, bb, splits, P, cfg, bank_dir, on_shard=None):  # noqa: ANN001 (types live in the packages)
    """Everything G1 computes before masks are opened: token bank, subspace fit and scores, intensity baseline.

    It receives the loaded dataset as the job has it (masks included) and must not depend on the masks;
    ``tests/test_label_leak.py`` runs it with permuted and zeroed masks and requires bit-identical output.

    Returns:
        ``(bank, rows, scores, brightness)``: the token bank, image rows per split, ``{arm: (n,)}`` scores of
        validation then test tokens, and ``(n_images, N)`` token brightness. ``on_shard`` is called with each
        finished bank shard (the HF Jobs backend uploads it).
    """
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.eval.baselines import token_intensity
    from covtoken.subspace import score_blocks

    items = data.items
    blocks = list(range(bb.spec.depth))
    bank = TokenBank.build(bank_dir, bb, items, blocks=blocks, final_norm=bool(P["final_norm"]),
                           batch_size=cfg.batch_size, on_shard=on_shard)
    rows = bank.split_rows(splits)
    scores = score_blocks(bank.tokens, blocks=blocks, constructions=list(cfg.constructions),
                          fit_rows=rows["train"], score_rows=np.concatenate([rows["val"], rows["test"]]),
                          params=dict(P["construction_params"]), seed=cfg.seed,
                          max_fit_tokens=int(P["max_fit_tokens"]))
    bright = token_intensity([it.image for it in items], bank.grid)
    return bank, rows, scores, bright


def save_eval_only(bank_dir: Path, image_ids: list[str], frac: np.ndarray) -> Path:
    """Store the per-token lesion fraction beside the token bank, apart from it: evaluation-only data."""
    import hashlib

    from covtoken.record import write_json_atomic

    out = bank_dir.with_name(bank_dir.name + ".eval-only")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "lesion_fraction.npy", frac)
    write_json_atomic(out / "manifest.json", {
        "what": "per-token lesion fraction (evaluation only; never read by label-free code)",
        "shape": list(frac.shape), "image_ids_sha256": hashlib.sha256("\n".join(image_ids).encode()).hexdigest()},
        overwrite=True)
    return out


def run_g1(cfg: G1Config, *, command: list[str]) -> int:
    from covtoken.backbone.frozen import load_backbone
    from covtoken.backbone.registry import get_spec
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.labels import token_labels, token_lesion_fraction
    from covtoken.eval.localisation import SplitScores, mid_layer_blocks
    from covtoken.eval.recipes import pack_split
    from covtoken.runner import Run, stage

    get_spec(cfg.backbone)  # an unknown backbone fails here, before any data is touched
    run = Run.for_gate("G1", cfg, command=command)  # the entry follows the evidence tier; --lock-entry overrides
    P = run.parameters

    data = load_gate_dataset(cfg, P, dataset=cfg.dataset, root=cfg.data_root)
    items = data.items
    splits = split_patients([it.patient_id for it in items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, items)
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    dataset_prov = split.dataset_provenance(data.provenance, roles={"fit": "train", "select": "val", "judge": "test"},
                                            calibration=cfg.calibration)
    with stage("backbone", backbone=cfg.backbone):
        bb = load_backbone(cfg.backbone, weights=cfg.weights, revision=cfg.revision, device=cfg.device)
    blocks = list(range(bb.spec.depth))
    backbone_prov = bb.provenance(blocks=blocks, final_norm=bool(P["final_norm"]))
    run.check_evidence(backbone=backbone_prov, dataset=dataset_prov)  # tier vs entry, before any token work
    final_block = blocks[-1]
    mid_blocks = mid_layer_blocks(P["mid_blocks"], bb.spec.depth)  # a bad locked rule fails before any work
    bank_dir = TokenBank.folder_for(cfg.work_dir, dataset=data.provenance["id"], revision=data.provenance["revision"],
                                    backbone=bb, items=items, blocks=blocks, final_norm=bool(P["final_norm"]))
    on_shard = run.sync_token_bank(bank_dir)  # HF Jobs: restore uploaded shards, upload new ones; None locally
    with stage("label_free_scores", images=len(items), blocks=len(blocks)):
        bank, rows, scores, bright = label_free_stage(data, bb, splits, P, cfg, bank_dir, on_shard=on_shard)
    n_tok = bank.grid[0] * bank.grid[1]

    # Masks are opened only here, inside covtoken.eval, after every score exists.
    frac = token_lesion_fraction(data.masks, bank.image_ids, bank.grid)
    save_eval_only(bank_dir, bank.image_ids, frac)
    labels = token_labels(frac, positive_min=P["positive_min"], negative_max=P["negative_max"])
    n_val = len(rows["val"]) * n_tok

    def split_scores(name: str, sl: slice) -> SplitScores:
        r = rows[name]
        return SplitScores(scores={k: v[sl] for k, v in scores.items()}, labels=labels[r].reshape(-1),
                           patients=np.repeat(np.array(bank.patient_ids)[r], n_tok),
                           images=np.repeat(np.array(bank.image_ids)[r], n_tok))

    val, test = split_scores("val", slice(0, n_val)), split_scores("test", slice(n_val, None))
    base = {"bright": (bright[rows["val"]].reshape(-1), bright[rows["test"]].reshape(-1)),
            "dark": (-bright[rows["val"]].reshape(-1), -bright[rows["test"]].reshape(-1))}
    inputs = {**pack_split("val", val), **pack_split("test", test),
              **{f"baseline.{k}.{s}": v[i] for k, v in base.items() for i, s in enumerate(("val", "test"))}}
    with stage("evaluate"):  # through the recipe the audit recomputes from the stored inputs
        res = run.evaluate("g1.localisation", inputs, {
            "constructions": list(cfg.constructions), "mid_blocks": mid_blocks, "final_block": final_block,
            "n_boot": int(P["n_boot"]), "ci_level": float(P["ci_level"]), "seed": cfg.seed})
    table, selection = res.extras["table"], res.extras["selection"]

    manifest = split.to_dict()
    if cfg.calibration:
        path = run.write_calibration(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
        logging.getLogger("covtoken.g1").info("calibration metrics written to %s", path)
        return 0
    run.artefacts.json("auroc_per_block.json", table, description="val/test token AUROC of every arm with CI")
    run.artefacts.json("selection.json", selection, description="what was selected on validation, and how")
    run.artefacts.json("splits.json", manifest, description="patient membership of each split, with its digest")
    run.notes.append(f"selected {selection['mid_arm']} on validation (AUROC {selection['val_auroc']:.4f})")
    n_test = res.metrics["mid_auroc"]["n"]["patients"]
    if n_test < MIN_PATIENTS_FOR_CI:
        run.notes.append(f"only {n_test} test patients: a patient-clustered bootstrap over so few clusters "
                         "understates the uncertainty; read the CIs as descriptive")
    path = run.finish(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
    logging.getLogger("covtoken.g1").info("record: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
