# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G2 - the density construction localises lesions across modalities and beats a fair saliency baseline.

For each modality (lung CT, kidney CT, breast ultrasound) a global Gaussian (construction A, Ledoit-Wolf
shrinkage) is fitted on training patients' tokens at the locked block and scores test patients' tokens.
The baseline is the EViT-style CLS-attention saliency of the same block of the same backbone (use the
registers variant of a backbone where one exists: high-norm artefact tokens soak up CLS attention, and the
record reports their fraction). Density and saliency are compared on the same test tokens with one
patient-clustered paired bootstrap per modality.

Run locally (embedded default: CT, kidney and ultrasound phantoms + the tiny ViT, about a minute):
    covtoken run jobs/g2_cross_modality.py --smoke
On real data (HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g2_cross_modality.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --backbone dinov2-base-reg --device cuda --datasets lung_ct=hf://datasets/org/lidc@<sha>,\\
kidney_ct=hf://datasets/org/kits23@<sha>,breast_us=hf://datasets/org/busi@<sha>
Calibration (never judged):
    python jobs/g2_cross_modality.py --smoke --calibration --results results/calibration-G2
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from covtoken.runner import JobConfig, job_main

EMBEDDED = ("lung_ct=phantom-ct", "kidney_ct=phantom-kidney", "breast_us=phantom-us")


@dataclass(frozen=True)
class G2Config(JobConfig):
    datasets: tuple = field(default=EMBEDDED, metadata={"help": "modality=dataset pairs, comma-separated"})
    data_roots: tuple = field(default=(), metadata={"help": "modality=folder pairs for file datasets"})
    work_dir: str = field(default=".cache/covtoken", metadata={"help": "token banks (resumable)"})


def main(argv: list[str] | None = None) -> int:
    return job_main(G2Config, run_g2, script="jobs/g2_cross_modality.py", doc=__doc__, argv=argv,
                    smoke={"datasets": EMBEDDED, "backbone": "tiny-vit", "device": "cpu"})


def _pairs(items: tuple, what: str) -> dict[str, str]:
    out = {}
    for it in items:
        key, sep, value = str(it).partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--{what}: expected modality=value, got {it!r}")
        out[key] = value
    return out


def label_free_stage(data, bb, splits, P, cfg, bank_dir, on_shard=None):  # noqa: ANN001 (types live in the packages)
    """Everything one modality computes before masks are opened: bank, density fit and scores, CLS saliency.

    Must not depend on the masks (``tests/test_label_leak.py`` permutes and zeroes them).

    Returns:
        ``(bank, rows, scores, extras)``: ``scores`` holds ``density`` and ``saliency`` for the test tokens
        (row-major over test images); ``extras`` the fraction of high-norm tokens among them.
    """
    from covtoken.backbone.attention import cls_attention_maps, high_norm_tokens
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.subspace import score_blocks

    block = int(P["block"])
    bank = TokenBank.build(bank_dir, bb, data.items, blocks=[block], final_norm=bool(P["final_norm"]),
                           batch_size=cfg.batch_size, on_shard=on_shard)
    rows = bank.split_rows(splits)
    dens = score_blocks(bank.tokens, blocks=[block], constructions=["A_gauss"], fit_rows=rows["train"],
                        score_rows=rows["test"], params={}, seed=cfg.seed, max_fit_tokens=int(P["max_fit_tokens"]))
    test_images = [data.items[i].image for i in rows["test"]]
    sal = cls_attention_maps(bb, test_images, [block], batch_size=cfg.batch_size)[block]
    high = high_norm_tokens(bank.tokens(block, rows["test"]))
    scores = {"density": dens[f"A_gauss@{block}"], "saliency": sal.reshape(-1).astype(np.float64)}
    return bank, rows, scores, {"high_norm_fraction": float(high.mean()), "high_norm": high}


def run_g2(cfg: G2Config, *, command: list[str]) -> int:
    from covtoken.backbone.frozen import load_backbone
    from covtoken.backbone.registry import get_spec
    from covtoken.backbone.tokenbank import TokenBank
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.labels import token_labels, token_lesion_fraction
    from covtoken.eval.localisation import SplitScores
    from covtoken.eval.recipes import pack_split
    from covtoken.runner import Run, load_gate_dataset, stage

    get_spec(cfg.backbone)
    datasets, roots = _pairs(cfg.datasets, "datasets"), _pairs(cfg.data_roots, "data-roots")
    run = Run.for_gate("G2", cfg, command=command)
    P = run.parameters
    if sorted(datasets) != sorted(P["modalities"]):
        raise ValueError(f"--datasets must name exactly the locked modalities {P['modalities']}, got {sorted(datasets)}")
    with stage("backbone", backbone=cfg.backbone):
        bb = load_backbone(cfg.backbone, weights=cfg.weights, revision=cfg.revision, device=cfg.device)
    if not 0 <= int(P["block"]) < bb.spec.depth:
        raise ValueError(f"locked block {P['block']} is outside {cfg.backbone}'s {bb.spec.depth} blocks")

    metrics, per_modality, dataset_prov = {}, {}, {}
    for m in P["modalities"]:
        name = datasets[m]
        data = load_gate_dataset(cfg, P, dataset=name, root=roots.get(m),
                                 options=P.get("dataset_options", {}).get(m, {}))
        splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
        validate_splits(splits, data.items)
        bank_dir = TokenBank.folder_for(cfg.work_dir, dataset=data.provenance["id"], revision=data.provenance["revision"],
                                        backbone=bb, items=data.items, blocks=[int(P["block"])],
                                        final_norm=bool(P["final_norm"]))
        with stage("label_free_scores", modality=m):
            bank, rows, scores, extras = label_free_stage(data, bb, splits, P, cfg, bank_dir,
                                                          on_shard=run.sync_token_bank(bank_dir))
        frac = token_lesion_fraction(data.masks, [bank.image_ids[i] for i in rows["test"]], bank.grid)
        labels = token_labels(frac, positive_min=P["positive_min"], negative_max=P["negative_max"]).reshape(-1)
        n_tok = bank.grid[0] * bank.grid[1]
        test = SplitScores(scores, labels, np.repeat(np.array(bank.patient_ids)[rows["test"]], n_tok),
                           np.repeat(np.array(bank.image_ids)[rows["test"]], n_tok))
        with stage("evaluate", modality=m):  # through the recipe the audit recomputes from the stored inputs
            mm = run.evaluate("g2.modality", {**pack_split("test", test), "high_norm": np.asarray(extras["high_norm"])},
                              {"modality": m, "n_boot": int(P["n_boot"]), "ci_level": float(P["ci_level"]),
                               "seed": cfg.seed}).metrics
        metrics.update(mm)
        per_modality[m] = {"dataset": data.provenance, "splits": SplitManifest(cfg.seed, dict(P["split_fractions"]),
                                                                               splits).to_dict()}
        dataset_prov[m] = {**{k: v for k, v in data.provenance.items() if k in ("id", "revision")},
                           "n_patients": {k: len(v) for k, v in splits.items()}}

    backbone_prov = bb.provenance(blocks=[int(P["block"])], final_norm=bool(P["final_norm"]))
    dataset = {"id": "+".join(f"{m}:{dataset_prov[m]['id']}" for m in P["modalities"]),
               "revision": "+".join(str(dataset_prov[m]["revision"]) for m in P["modalities"]),
               "splits": {"unit": "patient", "fit": "train", "judge": "test", "fractions": dict(P["split_fractions"]),
                          "role": "calibration" if cfg.calibration else "evaluation", "per_modality": dataset_prov},
               "n_patients": {f"{m}/{k}": v for m in P["modalities"] for k, v in dataset_prov[m]["n_patients"].items()},
               "split_seed": cfg.seed}
    if cfg.calibration:
        run.write_calibration(metrics=metrics, backbone=backbone_prov, dataset=dataset)
        return 0
    run.artefacts.json("per_modality.json", per_modality, description="dataset provenance and split membership per modality")
    path = run.finish(metrics=metrics, backbone=backbone_prov, dataset=dataset)
    logging.getLogger("covtoken.g2").info("record: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
