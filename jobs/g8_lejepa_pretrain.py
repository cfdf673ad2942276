# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G8 - LeJEPA pretraining on training patients' images beats the same architecture at random init.

Patients are split first. A timm ViT (the embedded tiny ViT's architecture and initialisation) is pretrained with
LeJEPA (global + local views, lam * SIGReg + (1 - lam) * view prediction, no teacher, no stop-gradient) on the
images of *training* patients only; no mask or label reaches that stage (tests/test_label_leak.py). Checkpoints
(safetensors, sha256 in a manifest, collapse monitor) are written periodically and the job resumes from the last
one when rerun after a kill. Then labels are opened in covtoken.eval: the checkpoint is chosen by a validation
linear probe (never by the SSL loss), and on test patients its linear-probe AUROC and 5-shot kNN balanced
accuracy are compared with the random initialisation (patient-clustered paired bootstrap), with a pixel baseline,
1/10-shot kNN, a data-efficiency curve, a segmentation probe and feature maps beside them.

With ``--dims 3`` the same gate runs on volumes: the training patients' slices are stacked into one volume per
patient, MONAI's 3-D ViT is pretrained with LeJEPA on random volumetric crops (covtoken.arch.lejepa3d), and the
evaluation is volume-level (a volume is positive when any slice holds a lesion; linear probe, kNN few-shot, data
efficiency and a pixel baseline over whole-volume embeddings; no segmentation probe). It is judged under its own
lock entry (``G8/embedded-3d`` on phantoms, ``G8/<tier>-3d`` elsewhere), whose protocol says ``dims: 3``.

Run locally (embedded default: CT phantoms, tiny ViT, 2 CPU cores, a few minutes):
    covtoken run jobs/g8_lejepa_pretrain.py --smoke
    covtoken run jobs/g8_lejepa_pretrain.py --smoke --dims 3 --dataset phantom-ct3d      # volumes, about 2 min
    python jobs/g8_lejepa_pretrain.py --smoke --results results/local      # the same, without the launcher
    (kill it and run the same command again: it resumes from the last checkpoint in --work-dir)

On real data (as an HF Job; see `covtoken submit --help`):
    covtoken submit jobs/g8_lejepa_pretrain.py --flavor a10g-small --timeout 4h --results-repo org/covtoken-results \\
        -- --dataset hf://datasets/org/lidc-idri-covtoken@<sha> --device cuda
    hf jobs run --flavor a10g-small --timeout 4h -s HF_TOKEN ...   (printed exactly by `covtoken submit --dry-run`)

Calibration (proposes thresholds; never judged):
    python jobs/g8_lejepa_pretrain.py --smoke --calibration --results results/calibration-G8
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covtoken.runner import JobConfig, job_main, load_gate_dataset


@dataclass(frozen=True)
class G8Config(JobConfig):
    dataset: str = field(default="phantom-ct", metadata={"help": "dataset name or source (see covtoken.data.catalog)"})
    data_root: str | None = field(default=None, metadata={"help": "folder of a file-based dataset (busi, lidc)"})
    work_dir: str = field(default=".cache/covtoken", metadata={"help": "pretraining checkpoints (resumable)"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads for this run (0: leave the default)"})
    dims: int = field(default=2, metadata={"help": "2: images (timm ViT); 3: volumes, one per patient (MONAI 3-D ViT, "
                                                   "volume-level evaluation; a volumetric dataset such as "
                                                   "phantom-ct3d or kits23), judged under the <entry>-3d lock entry"})


def main(argv: list[str] | None = None) -> int:
    return job_main(G8Config, run_g8, script="jobs/g8_lejepa_pretrain.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-ct", "backbone": "tiny-vit", "device": "cpu"})


def checkpoint_dir(cfg: G8Config, provenance: dict, P: dict) -> Path:
    """Checkpoints of one (dataset, seed, protocol): rerunning the same command resumes in the same folder."""
    key = hashlib.sha256(json.dumps({"p": P["pretraining"], "split": P["split_fractions"], "seed": cfg.seed,
                                     "data": [provenance["id"], provenance["revision"]]},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.work_dir) / "lejepa" / f"{Path(str(provenance['id'])).name}-seed{cfg.seed}-{key}"


def label_free_stage(data, splits, P, cfg, ckpt_dir, on_checkpoint=None, stop_after=None):  # noqa: ANN001
    """Pretraining on training patients' images, then label-free features of every image for every arm.

    It receives the loaded dataset as the job has it (sealed masks included) and must not depend on them;
    ``tests/test_label_leak.py`` runs it with permuted and zeroed masks and requires bit-identical output, and
    checks that the pretraining saw exactly the training patients' image ids.

    Returns:
        ``(pretrain_result, inputs)``: :class:`covtoken.arch.pretrain.PretrainResult` and
        :class:`covtoken.eval.g8.G8Inputs` minus nothing (features and tokens of every arm).
    """
    import torch

    from covtoken.arch.lejepa import LeJEPAConfig
    from covtoken.arch.pretrain import encoder_state_from_checkpoint, pretrain
    from covtoken.backbone.embed import embed_images, preprocess_batch
    from covtoken.backbone.lejepa import encoder_backbone
    from covtoken.backbone.registry import get_spec
    from covtoken.eval.g8 import G8Inputs

    spec = get_spec(cfg.backbone)
    pcfg = LeJEPAConfig.from_params(P["pretraining"])
    items = sorted(data.items, key=lambda it: it.image_id)
    train = set(splits["train"])
    fit = [it for it in items if it.patient_id in train]
    res = pretrain([it.image for it in fit], [it.image_id for it in fit], pcfg, out_dir=ckpt_dir, seed=cfg.seed,
                   mean=spec.mean, std=spec.std, device=cfg.device, on_checkpoint=on_checkpoint,
                   stop_after=stop_after)
    if stop_after is not None:
        return res, None
    images = [it.image for it in items]
    arms = {"random_init": None, **{f"step{c['step']:06d}": Path(ckpt_dir) / c["path"] for c in res.checkpoints}}
    features, tokens = {}, {}
    last = int(pcfg.encoder["depth"]) - 1
    for arm, path in arms.items():
        state = None if path is None else encoder_state_from_checkpoint(path)
        bb = encoder_backbone(pcfg.encoder, state, name=f"lejepa-{arm}", init_seed=pcfg.init_seed, mean=spec.mean,
                              std=spec.std, origin="embedded" if path is None else f"checkpoint:{path.name}",
                              device=cfg.device)
        features[arm] = embed_images(bb, images, batch_size=cfg.batch_size)
        tokens[arm] = np.concatenate([bb.patch_tokens(preprocess_batch(bb, images[i:i + cfg.batch_size]), [last],
                                                      final_norm=True)[last].numpy()
                                      for i in range(0, len(images), cfg.batch_size)])
    side = int(P["pixel_baseline_size"])
    px = torch.nn.functional.adaptive_avg_pool2d(preprocess_batch(bb, images)[:, :1], side)
    features["pixels"] = px.reshape(len(images), -1).numpy()
    row = {it.image_id: i for i, it in enumerate(items)}
    rows = {k: np.array(sorted(row[it.image_id] for it in items if it.patient_id in set(v)), dtype=np.int64)
            for k, v in splits.items()}
    inputs = G8Inputs([it.image_id for it in items], [it.patient_id for it in items], rows, features, tokens,
                      [a for a in arms if a != "random_init"], bb.grid)
    return res, inputs


def label_free_stage_3d(data, splits, P, cfg, ckpt_dir, on_checkpoint=None, stop_after=None):  # noqa: ANN001
    """The 3-D label-free stage: LeJEPA on the training patients' volumes, then frozen embeddings of every volume
    for every arm (random init, each checkpoint) and a pixel baseline. Same contract as :func:`label_free_stage`
    (no mask read; ``tests/test_g8_3d_job.py`` checks it bit for bit with permuted and zeroed masks, and that
    pretraining is fed exactly the training patients' volumes).

    Returns:
        ``(pretrain_result, inputs)``: :class:`covtoken.arch.lejepa3d.Pretrain3DResult` and
        :class:`covtoken.eval.g8.G8Inputs` with one row per volume (``slices_of`` names each volume's slices).
    """
    import torch

    from covtoken.arch.lejepa3d import (LeJEPA3DConfig, embed_volumes, model_from_checkpoint, patient_volumes,
                                        pretrain_volumes)
    from covtoken.eval.g8 import G8Inputs

    pcfg = LeJEPA3DConfig.from_params(P["pretraining"])
    res = pretrain_volumes(data, splits, pcfg, seed=cfg.seed, out_dir=ckpt_dir, device=cfg.device,
                           on_checkpoint=on_checkpoint, stop_after=stop_after)
    if stop_after is not None:
        return res, None
    vols, ids, slices_of = patient_volumes(data.items, sorted({it.patient_id for it in data.items}))
    arms = {"random_init": None, **{f"step{c['step']:06d}": Path(ckpt_dir) / c["path"] for c in res.checkpoints}}
    features = {arm: embed_volumes(model_from_checkpoint(path, pcfg), vols, pcfg, batch_size=cfg.batch_size,
                                   device=cfg.device) for arm, path in arms.items()}
    side = [int(n) for n in P["pixel_baseline_size"]]
    features["pixels"] = np.stack([torch.nn.functional.adaptive_avg_pool3d(torch.as_tensor(v)[None], side).reshape(-1)
                                   .numpy() for v in vols]).astype(np.float32)
    row = {v: i for i, v in enumerate(ids)}
    rows = {k: np.array(sorted(row[p] for p in v), dtype=np.int64) for k, v in splits.items()}
    inputs = G8Inputs(ids, list(ids), rows, features, {}, [a for a in arms if a != "random_init"], (),
                      slices_of=slices_of)
    return res, inputs


def run_g8(cfg: G8Config, *, command: list[str]) -> int:
    from covtoken.runner import torch_threads

    with torch_threads(cfg.threads):  # on busy cores one thread is often faster for the tiny default
        return _run(cfg, command=command)


def _run(cfg: G8Config, *, command: list[str]) -> int:
    from covtoken.arch.pretrain import encoder_state_from_checkpoint
    from covtoken.backbone.registry import get_spec
    from covtoken.data.catalog import is_embedded
    from covtoken.data.splits import SplitManifest, split_patients, validate_splits
    from covtoken.eval.g8 import g8_inputs, g8_volume_inputs, segmentation_arrays
    from covtoken.eval.ssl_figures import feature_map_figure
    from covtoken.runner import ConfigError, Run, stage

    log = logging.getLogger("covtoken.g8")
    if cfg.dims not in (2, 3):
        raise ConfigError(f"--dims {cfg.dims}: expected 2 (images) or 3 (volumes)")
    spec = get_spec(cfg.backbone)  # an unknown backbone fails here, before any data is touched
    embedded = is_embedded(cfg.dataset) and cfg.backbone == "tiny-vit"
    volumetric = cfg.dims == 3
    run = Run.for_gate("G8", cfg, command=command, default_entry="embedded" if embedded else "real",
                       variant="3d" if volumetric else None)
    P = run.parameters
    if int(P.get("dims", 2)) != cfg.dims:
        raise ConfigError(f"--dims {cfg.dims}: lock entry {run.entry_key} locks a {int(P.get('dims', 2))}-D protocol; "
                          f"use --dims {int(P.get('dims', 2))}, or a lock entry whose parameters say dims: {cfg.dims}")
    data = load_gate_dataset(cfg, P, dataset=cfg.dataset, root=cfg.data_root)
    splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, data.items)
    ckpt_dir = checkpoint_dir(cfg, data.provenance, P)
    on_ckpt = run.sync_token_bank(ckpt_dir)  # HF Jobs: restore uploaded checkpoints, upload new ones
    stage_fn = label_free_stage_3d if volumetric else label_free_stage
    with stage("pretrain_and_embed", images=len(data.items), checkpoints=str(ckpt_dir), dims=cfg.dims):
        pre, inputs = stage_fn(data, splits, P, cfg, ckpt_dir, on_checkpoint=on_ckpt)
    if pre.resumed_from:
        run.notes.append(f"pretraining resumed from the checkpoint at step {pre.resumed_from} (an earlier attempt)")

    # Labels are opened only here, inside covtoken.eval, after pretraining and every embedding exist; the metrics
    # come out of stored recipes (g8.probes, g8.segmentation) that the audit recomputes.
    with stage("evaluate"):
        if volumetric:
            probes = run.evaluate("g8.probes", *g8_volume_inputs(inputs, data.masks, inputs.slices_of, P,
                                                                 seed=cfg.seed))
        else:
            arrays, args, seg, seg_args = g8_inputs(inputs, data.masks, P, seed=cfg.seed)
            probes = run.evaluate("g8.probes", arrays, args)
        chosen = probes.extras["selection"]["checkpoint"]["chosen"]
        segm = None if volumetric else run.evaluate("g8.segmentation",
                                                    segmentation_arrays(seg, seg_args, inputs, chosen), seg_args)
    metrics = {**probes.metrics, **(segm.metrics if segm else {})}
    entry = next(c for c in pre.checkpoints if f"step{c['step']:06d}" == chosen)
    backbone_prov = _encoder_provenance(spec, P, entry, chosen, volumetric=volumetric)
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    dataset_prov = split.dataset_provenance(data.provenance, roles={"fit": "train (pretraining, probes)",
                                                                    "select": "val (checkpoint, C)", "judge": "test"},
                                            calibration=cfg.calibration)
    if cfg.calibration:
        path = run.write_calibration(metrics=metrics, backbone=backbone_prov, dataset=dataset_prov)
        log.info("calibration metrics written to %s", path)
        return 0

    from safetensors.torch import save as save_bytes

    fed = sorted(pre.volume_ids if volumetric else pre.image_ids)
    run.artefacts.json("pretraining.json", {
        "protocol": dict(P["pretraining"]), "seed": cfg.seed, "dims": cfg.dims, "checkpoints": pre.checkpoints,
        "resumed_from": pre.resumed_from, "seconds_this_attempt": pre.seconds,
        "volumes_fed" if volumetric else "images_fed": {
            "n": len(fed), "sha256": hashlib.sha256("\n".join(fed).encode()).hexdigest(),
            "patients": sorted(splits["train"])}},
        description="LeJEPA protocol, per-step losses, checkpoint digests and collapse monitor "
                    "(SIGReg, RankMe, per-dim std), ids of the images pretraining saw")
    run.artefacts.json("selection.json", probes.extras["selection"], description="checkpoint and probe C chosen on validation")
    run.artefacts.json("tables.json", {**probes.extras["tables"], **({"segmentation": segm.extras["segmentation"]}
                                                                     if segm else {})},
                       description="validation probes, kNN episodes, data efficiency"
                                   + ("" if volumetric else ", segmentation probe per patient"))
    run.artefacts.json("splits.json", split.to_dict(), description="patient membership of each split, with its digest")
    state = encoder_state_from_checkpoint(ckpt_dir / entry["path"])
    run.artefacts.bytes("encoder.safetensors", save_bytes(state, metadata={"covtoken": json.dumps(  # one key: stable bytes
                            {"checkpoint_sha256": entry["sha256"], "run_id": run.run_id, "step": chosen}, sort_keys=True)}),
                        description=f"encoder weights of the selected checkpoint {chosen} "
                                    f"({'MONAI ViT' if volumetric else 'timm'} keys)")
    if segm is not None:
        fig = feature_map_figure(inputs, chosen, segm.extras["preview_token_masks"])
        run.artefacts.bytes("feature_maps.png", fig, description="PCA of final-block patch tokens (random init vs "
                                                                 "pretrained) and segmentation-probe masks, test images")
    else:
        run.notes.append("3-D mode: volume-level evaluation (a volume is positive when any slice holds a lesion); "
                         "no segmentation probe or feature maps")
    run.notes.append(f"checkpoint {chosen} chosen on validation patients (linear-probe AUROC); the SSL loss is "
                     "never used for selection")
    run.notes.append("flow check on phantoms: the encoder is pretrained here, not a pinned pretrained checkpoint"
                     if is_embedded(cfg.dataset) else "pretrained on this dataset's training patients")
    path = run.finish(metrics=metrics, backbone=backbone_prov, dataset=dataset_prov)
    from covtoken.backbone.lejepa import render_card
    from covtoken.record import read_record, sha256_file

    art = path.parent / "artefacts" / run.run_id
    card = render_card(read_record(path), json.loads((art / "pretraining.json").read_text()),
                       name=f"LeJEPA {backbone_prov['name'].removesuffix('+lejepa')} ({run.run_id})", weights_file="encoder.safetensors",
                       weights_sha256=sha256_file(art / "encoder.safetensors"))
    from covtoken.runner import write_model_card

    card_path = write_model_card(cfg.results, run.run_id, card)
    log.info("record: %s; model card: %s", path, card_path)
    return 0


def _encoder_provenance(spec, P: dict, entry: dict, chosen: str, *, volumetric: bool) -> dict:  # noqa: ANN001
    """The record's backbone provenance: the encoder this run pretrained, pinned by the chosen checkpoint's digest."""
    common = {"weights_digest": entry["sha256"], "final_norm": True, "pinned_revision": None,
              "resolved_revision": None, "weights_files": {}}
    if not volumetric:
        return {**spec.provenance(), **common, "name": f"{spec.name}+lejepa", "blocks": [spec.depth - 1],
                "weights_origin": f"pretrained by this run (LeJEPA, {chosen}); random-init baseline = {spec.name}"}
    import monai

    pre = P["pretraining"]
    vit = dict(pre["vit"])
    return {**common, "name": "monai-vit3d+lejepa", "library": f"monai {monai.__version__}", "hub_id": None,
            "revision": None, "revision_pinned": True, "image_size": list(pre["input_size"]),
            "patch_size": list(pre["patch_size"]), "depth": int(vit["num_layers"]), "width": int(vit["hidden_size"]),
            "num_prefix_tokens_stripped": 0, "num_registers": 0, "block_index_base": 0,
            "blocks": [int(vit["num_layers"]) - 1],
            "preprocess": {"resize": "whole volume, trilinear to input_size", "mean": [0.5], "std": [0.5]},
            "weights_origin": f"pretrained by this run (LeJEPA 3-D, {chosen}); random-init baseline = the same "
                              f"monai.networks.nets.ViT from init_seed {pre.get('init_seed', 0)}"}


if __name__ == "__main__":
    raise SystemExit(main())
