# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G7 - a DermaJEPA-style probe head generalises to a held-out nuisance family.

Each training image gets nuisance views from two families (lighting, geometry; :mod:`covtoken.data.nuisance`),
and predictors over L2-normalised frozen image embeddings (linear warm-started at the identity, and an
identity-residual MLP; SGD and Adam; several training seeds) learn to map an image's embedding to its views'
embeddings - stable pairs only. Evaluation lesions get one view under the held-out family (locked; geometry, under
which pixel baselines cannot match a re-framed lesion pixel by pixel). Stable pair = one image and its own view;
changing pair = one image and another lesion's view: both kinds go through the same code path. Only then
are the diagnoses opened, in covtoken.eval, to couple lesions of the same diagnosis and site into changing
pairs. The head and the strongest baseline (pixel L2, SSIM distance, raw cosine) are chosen on validation
lesions; on test lesions the probe (mean over seeds) is judged against that baseline with a lesion-clustered
paired bootstrap, under the locked thresholds, and written as a gate record with the probe checkpoints and a
model card. Every baseline's test AUROC on the held-out family is reported; if the validation-chosen baseline
reaches 0.99 the proxy is degenerate and the locked validity rule V1 makes the decision inconclusive. A published
DermaJEPA predictor (``--predictor file.npz``) is evaluated beside the trained heads (reported, never judged) and
refused before any compute when it was trained on another embedding model or dimension.

Run locally (embedded default: dermoscopy-like phantoms + the tiny ViT, 2 CPU cores, under a minute):
    covtoken run jobs/g7_dermajepa_probe.py --smoke
    python jobs/g7_dermajepa_probe.py --smoke --results results/local        # the same, without the launcher

On real data and a real backbone (as an HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g7_dermajepa_probe.py --flavor a10g-small --timeout 2h --results-repo org/covtoken-results \\
        -- --dataset ham10000 --data-root /data/ham10000 --backbone dermlip-vitb16 --revision <40-hex sha> --device cuda
    hf jobs run --flavor a10g-small --timeout 2h -s HF_TOKEN ...   (printed exactly by `covtoken submit --dry-run`)

Calibration (proposes thresholds; never judged):
    python jobs/g7_dermajepa_probe.py --smoke --calibration --results results/calibration-G7
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np

from covtoken.runner import JobConfig, job_main, load_gate_dataset, torch_threads

MIN_LESIONS_FOR_CI = 20


@dataclass(frozen=True)
class G7Config(JobConfig):
    dataset: str = field(default="phantom-derm", metadata={"help": "dataset name or source (see covtoken.data.catalog)"})
    data_root: str | None = field(default=None, metadata={"help": "folder of a file-based dataset (ham10000)"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads for this run (0: leave the default)"})
    predictor: str | None = field(default=None, metadata={
        "help": "a published DermaJEPA predictor .npz evaluated beside the trained heads (reported, never judged); "
                "refused unless its feature_dim and input_embedding_model_id match the backbone"})


@dataclass(frozen=True)
class LabelFree:
    """What G7 computes before any label is opened (see :func:`label_free_stage`)."""

    table: Any                      # covtoken.data.pairs.LesionTable
    reps: dict[str, dict[str, str]]  # split -> lesion -> representative image id
    view_of: dict[str, str]          # representative image id -> held-out view key
    keys: list[str]                  # image ids and view keys, row order of `embeddings`
    embeddings: np.ndarray           # (m, d) L2-normalised
    eval_pixels: dict[str, np.ndarray]  # evaluation representatives and their views
    train_views: list                # covtoken.data.pairs.View of the training images
    trained: dict[str, list]         # head name -> [TrainedProbe per training seed]


def main(argv: list[str] | None = None) -> int:
    return job_main(G7Config, _run_with_threads, script="jobs/g7_dermajepa_probe.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-derm", "backbone": "tiny-vit", "device": "cpu"})


def _run_with_threads(cfg: G7Config, *, command: list[str]) -> int:
    with torch_threads(cfg.threads):  # on busy cores one thread is often faster for the tiny default
        return run_g7(cfg, command=command)


def label_free_stage(data, bb, splits, P, cfg) -> LabelFree:  # noqa: ANN001 (types live in the packages)
    """Everything G7 computes before labels are opened: nuisance views, embeddings, trained probe heads.

    It receives the loaded dataset as the job has it (sealed masks and diagnoses included) and must not depend
    on them; ``tests/test_label_leak.py`` runs it with permuted and zeroed masks/labels and requires
    bit-identical output. Training sees stable pairs of training images only.
    """
    from covtoken.arch.probe import HeadConfig, l2_normalise, train_probe
    from covtoken.backbone.embed import embed_images
    from covtoken.data.pairs import (lesion_table, plan_views, render_views, representatives, stable_pairs,
                                     train_families)

    images = {it.image_id: it.image for it in data.items}
    table = lesion_table(data.items)
    held = P["held_out_family"]
    train_ids = sorted(i for i in images if table.patient_of[i] in splits["train"])
    train_views = plan_views(table, train_ids, train_families(held), n_views=int(P["train_views_per_image"]),
                             seed=cfg.seed)
    reps = {name: representatives(table, splits[name]) for name in ("val", "test")}
    eval_views = plan_views(table, [r for split in reps.values() for r in split.values()], [held], n_views=1,
                            seed=cfg.seed)
    keys: list[str] = []
    chunks: list[np.ndarray] = []

    def embed(pixels: dict[str, np.ndarray]) -> None:
        names = sorted(pixels)
        keys.extend(names)
        chunks.append(embed_images(bb, [pixels[k] for k in names], batch_size=cfg.batch_size))

    embed(images)
    for start in range(0, len(train_views), 512):  # views rendered and embedded in chunks, pixels dropped
        embed(render_views(images, train_views[start:start + 512], seed=cfg.seed))
    rendered = render_views(images, eval_views, seed=cfg.seed)
    embed(rendered)
    eval_pixels = {**{v.image_id: images[v.image_id] for v in eval_views}, **rendered}
    z = l2_normalise(np.concatenate(chunks))
    row = {k: i for i, k in enumerate(keys)}
    pairs = stable_pairs(train_views)
    zc, zt = z[[row[p.context] for p in pairs]], z[[row[p.target] for p in pairs]]
    trained: dict[str, list] = {}
    for spec in P["heads"]:
        head = HeadConfig.from_dict(spec)
        if head.name in trained:
            raise ValueError(f"two heads named {head.name!r} in the locked parameters")
        trained[head.name] = [train_probe(zc, zt, head, seed=int(s)) for s in P["train_seeds"]]
    return LabelFree(table, reps, {v.image_id: v.key for v in eval_views}, keys, z, eval_pixels, train_views, trained)


def load_published_predictor(path: str, bb, probe_image: np.ndarray):  # noqa: ANN001, ANN201 (types in packages)
    """Load a published DermaJEPA ``.npz`` predictor for this backbone, before any compute.

    The backbone's embedding dimension is read from one forward pass of ``probe_image``; a checkpoint trained on
    another embedding model or dimension is refused (``CheckpointError`` naming the field).
    """
    from covtoken.arch.probe_io import load_dermajepa_npz
    from covtoken.backbone.embed import embed_images, embedding_model_id

    dim = int(embed_images(bb, [probe_image], batch_size=1).shape[1])
    return load_dermajepa_npz(path, expected_model_id=embedding_model_id(bb.spec), expected_dim=dim)


def run_g7(cfg: G7Config, *, command: list[str]) -> int:
    from covtoken.arch.probe import predict
    from covtoken.arch.probe_io import ProbeCheckpoint, probe_bytes, render_model_card
    from covtoken.backbone.embed import embedding_model_id
    from covtoken.backbone.frozen import load_backbone
    from covtoken.backbone.registry import get_spec
    from covtoken.data.pairs import lesion_table, train_families
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.change import EvalLesions, build_pairs, score_pairs
    from covtoken.eval.gate_g7 import g7_inputs
    from covtoken.roles import role_output
    from covtoken.runner import Run, stage

    log = logging.getLogger("covtoken.g7")
    get_spec(cfg.backbone)  # an unknown backbone fails here, before any data is touched
    run = Run.for_gate("G7", cfg, command=command)
    P = run.parameters

    data = load_gate_dataset(cfg, P, dataset=cfg.dataset, root=cfg.data_root)
    table = lesion_table(data.items)
    splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, data.items, lesion_ids=dict(table.lesion_of))
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    dataset_prov = split.dataset_provenance(
        data.provenance, roles={"lesion_disjoint": True, "fit": "train", "select": "val", "judge": "test"},
        calibration=cfg.calibration,
        nuisance={"train_families": sorted(train_families(P["held_out_family"])),
                  "held_out_family": P["held_out_family"], "seed": cfg.seed})
    with stage("backbone", backbone=cfg.backbone):
        bb = load_backbone(cfg.backbone, weights=cfg.weights, revision=cfg.revision, device=cfg.device)
    backbone_prov = {**bb.provenance(blocks=[bb.spec.depth - 1], final_norm=True),
                     "embedding": "pooled image embedding (covtoken.backbone.embed), L2-normalised",
                     "input_embedding_model_id": embedding_model_id(bb.spec)}
    run.check_evidence(backbone=backbone_prov, dataset=dataset_prov)  # tier vs entry, before any compute
    published = load_published_predictor(cfg.predictor, bb, data.items[0].image) if cfg.predictor else None
    with stage("label_free", images=len(data.items), heads=len(P["heads"]), seeds=len(P["train_seeds"])):
        lf = label_free_stage(data, bb, splits, P, cfg)

    # Diagnoses are opened only here, inside covtoken.eval, after every predictor is trained.
    row = {k: i for i, k in enumerate(lf.keys)}
    lesions = {name: EvalLesions(reps=r, sites={l: table.site_of[i] for l, i in r.items()},
                                 patients={l: table.patient_of[i] for l, i in r.items()}, view_of=lf.view_of)
               for name, r in lf.reps.items()}
    with stage("evaluate"):
        pairs = {name: build_pairs(les, data.masks, seed=cfg.seed) for name, les in lesions.items()}
        predictors = {f"{h}/seed{t.seed}": partial(predict, t.kind, t.params) for h, ts in lf.trained.items()
                      for t in ts}
        role_output("fit", "predictors", (lf.keys, lf.embeddings, predictors))  # what the pair scores read
        if published is not None:
            predictors["published"] = partial(predict, published.kind, published.params)
        scores = {name: score_pairs(p, embeddings=lf.embeddings, row_of=row, predictors=predictors,
                                    images=lf.eval_pixels, pixel_size=int(P["pixel_size"]))
                  for name, p in pairs.items()}
        heads = {h: [f"{h}/seed{t.seed}" for t in ts] for h, ts in lf.trained.items()}
        ev = run.evaluate("g7.change", *g7_inputs(pairs=pairs, scores=scores, heads=heads, n_boot=int(P["n_boot"]),
                                                  ci_level=float(P["ci_level"]), seed=cfg.seed,
                                                  reported=("published",) if published is not None else ()))
        res = SimpleNamespace(metrics=ev.metrics, **ev.extras)  # the audit recomputes it from the stored inputs

    # the choices made on validation; the rest of res.selection (EER, inversions, means on test) is judge-role
    role_output("select", "selection", {k: res.selection[k] for k in ("baseline", "probe_head")})
    role_output("judge", "metrics", (res.metrics, res.selection))
    manifest = split.to_dict()
    if cfg.calibration:
        path = run.write_calibration(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
        log.info("calibration metrics written to %s", path)
        return 0

    head = res.selection["probe_head"]["chosen"]
    run.artefacts.json("selection.json", res.selection, description="baseline and probe head chosen on validation")
    run.artefacts.json("auroc_table.json", res.table, description="val/test AUROC of every arm (directional)")
    run.artefacts.json("training.json", {h: [{"seed": t.seed, "n_stable_pairs": t.n_pairs, "n_changing_pairs": 0,
                                              "loss_curve": t.losses.tolist()} for t in ts]
                                         for h, ts in lf.trained.items()},
                       description="stable-pair loss per epoch of every head and training seed")
    run.artefacts.json("splits.json", manifest, description="patient membership of each split, with its digest")
    run.artefacts.json("views.json", [{"key": v.key, "lesion_id": v.lesion_id, "params": v.params.as_dict()}
                                      for v in lf.train_views],
                       description="nuisance parameters of every training view (eval views: held-out family)")
    ckpts = []
    for t in lf.trained[head]:
        ck = ProbeCheckpoint(t.kind, t.feature_dim, embedding_model_id(bb.spec), t.params, model_id=f"covtoken-g7-{head}",
                             metadata={"run_id": run.run_id, "head": head, "train_seed": str(t.seed),
                                       "backbone_revision": str(backbone_prov.get("revision"))})
        name = f"probe-{head}-seed{t.seed}.safetensors"
        run.artefacts.bytes(name, probe_bytes(ck), description=f"selected probe head {head}, training seed {t.seed}")
        ckpts.append(f"artefacts/{run.run_id}/{name}")
    run.notes.append(f"probe head {head} and baseline {res.selection['baseline']['chosen']} chosen on validation")
    if res.metrics["baseline_auroc"]["value"] >= 0.99:
        run.notes.append(f"the validation-chosen baseline {res.selection['baseline']['chosen']} reaches test AUROC "
                         f"{res.metrics['baseline_auroc']['value']:.3f} on the held-out family: the proxy task is "
                         "degenerate (see criterion V1) and says nothing about the probe")
    if published is not None:
        run.notes.append(f"published predictor {published.model_id or cfg.predictor} ({published.kind}, "
                         f"{published.feature_dim}-d, trained on {published.input_embedding_model_id}) reported as "
                         "published_auroc; it is not judged")
    for arm, inv in res.selection["inverted_on_test"].items():
        if inv:
            run.notes.append(f"{arm}: test AUROC below 0.5 - an inverted score, reported as is (never flipped)")
    if pairs["test"].n_lesions < MIN_LESIONS_FOR_CI:
        run.notes.append(f"only {pairs['test'].n_lesions} test lesions: read the lesion-clustered CIs as descriptive")
    path = run.finish(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
    from covtoken.record import read_record

    card = render_model_card(read_record(path), checkpoint=ckpts[0], selection=res.selection)
    from covtoken.runner import write_model_card

    card_path = write_model_card(cfg.results, run.run_id, card)
    log.info("record: %s; model card: %s", path, card_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
