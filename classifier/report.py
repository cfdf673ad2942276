"""G9's run glue: open the run, train and calibrate the arms, judge, write the record and the artefact folder.

Kept out of ``jobs/g9_classifier.py`` so the job stays a launcher; the science is in
:mod:`covtoken.classifier.experiment` (fit + calibrate) and :mod:`covtoken.eval.g9` (judged metrics).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["open_g9_run", "load_arms", "finish_g9", "arm_sources", "check_arm_sources", "weights_bound", "load_arm_configs",
           "render_confusion", "render_risk_coverage"]

log = logging.getLogger("covtoken.g9")


ARMS_SHARING_WEIGHTS = {"configured": ("weights", "revision"), "full": ("weights", "revision"),
                        "baseline": ("baseline_weights", "baseline_revision")}


def arm_sources(cfg: Any) -> dict[str, tuple[str | None, str | None]]:
    """arm -> (local weights folder, Hub revision) from the job options: the configured and full arms share
    ``--weights`` / ``--revision``, the baseline has ``--baseline-weights`` / ``--baseline-revision``."""
    return {arm: (getattr(cfg, w), getattr(cfg, r)) for arm, (w, r) in ARMS_SHARING_WEIGHTS.items()}


def check_arm_sources(cfg: Any, arms: dict) -> None:
    """Every arm's backbone can be built from what the options give, before any data or download: a Hub entry
    needs a local folder or a commit (its pinned one, or ``--revision`` for an entry registered with
    ``revision_pinned=False``), never both; an embedded (seeded) entry takes neither. Raises ``ConfigError``
    (one line naming the flag)."""
    from ..runner import ConfigError
    from .backbones import get_classifier_spec, resolve_revision

    for arm, (weights, revision) in arm_sources(cfg).items():
        wflag, rflag = (f"--{f.replace('_', '-')}" for f in ARMS_SHARING_WEIGHTS[arm])
        spec = get_classifier_spec(arms[arm].backbone["name"])
        if spec.mini:
            if weights is not None or revision is not None:
                raise ConfigError(f"{wflag if weights is not None else rflag}: backbone {spec.name} (arm {arm}) is "
                                  "embedded (seeded); it takes neither weights nor a revision")
            continue
        if weights is not None and revision is not None:
            raise ConfigError(f"{wflag} and {rflag}: backbone {spec.name} (arm {arm}) takes either a local weights "
                              "folder or a Hub revision, not both")
        if weights is None:
            try:
                resolve_revision(spec, revision)
            except ValueError as exc:
                raise ConfigError(f"{rflag}: arm {arm}: {exc}") from None


def weights_bound(cfg: Any, arms: dict) -> tuple[str, str]:
    """The highest evidence tier the arms' backbones allow before anything is loaded, and why it is lower
    (:func:`covtoken.evidence.weights_upper_bound` on each arm: every arm must be verifiable for ``real``)."""
    from ..evidence import weights_upper_bound

    whys = []
    for arm, (weights, revision) in arm_sources(cfg).items():
        tier, why = weights_upper_bound(backbone=arms[arm].backbone["name"], weights=weights, revision=revision,
                                        registry="classifier")
        if tier != "real" and why not in whys:
            whys.append(why)
    return ("flow-check", "; ".join(whys)) if whys else ("real", "")


def _entry_parameters(cfg: Any, entry: str) -> Any:
    """The protocol parameters of ``entry`` as the run will read them (the lock; the gate template for a
    calibration run)."""
    from ..lock import ThresholdLock, gate_template_entry
    from ..runner import default_lock_path

    if cfg.calibration:
        return gate_template_entry(entry)["parameters"]
    return ThresholdLock.load(Path(cfg.lock) if cfg.lock else default_lock_path()).entry(entry).parameters


def load_arm_configs(cfg: Any, params: Any) -> dict:
    """The three arm configs an entry's parameters name (``--classifier-config`` replaces the configured one and,
    with the full questionnaire, the full one), validated."""
    from .backbones import get_classifier_spec
    from .config import ClassifierConfig

    configured = ClassifierConfig.load(cfg.classifier_config or params["classifier_config"])
    get_classifier_spec(configured.backbone["name"])  # unknown names fail here
    full = configured.with_feature_schema(params["full_feature_schema"])
    if configured.feature_schema is not None:
        configured.feature_schema.check_subset_of(full.feature_schema)
    baseline = ClassifierConfig.load(params["baseline_config"])
    get_classifier_spec(baseline.backbone["name"])
    return {"configured": configured, "full": full, "baseline": baseline}


def open_g9_run(cfg: Any, *, command: list[str]) -> tuple[Any, dict]:
    """Validate the three arm configs and their weight sources and open the run under the locked entry, before any
    data is read or any weights are downloaded.

    Real files are judged only under ``G9/real``, which needs every arm's weights to be verifiable (a pinned revision
    and a recorded digest in :mod:`covtoken.classifier.backbones`, or a local folder holding the registered bytes);
    otherwise the run is refused here with one line naming what is missing.
    """
    from ..data.catalog import is_embedded
    from ..evidence import EvidenceError
    from ..runner import ConfigError, JobConfig, Run

    if cfg.backbone != JobConfig.backbone:
        raise ConfigError(f"--backbone {cfg.backbone}: G9 takes its backbone from the classifier config "
                          "(--classifier-config; backbones: covtoken.classifier.backbones)")
    embedded = is_embedded(cfg.dataset)
    entry = cfg.lock_entry or f"G9/{'embedded' if embedded else 'real'}"
    arms = load_arm_configs(cfg, _entry_parameters(cfg, entry))
    check_arm_sources(cfg, arms)
    bound, why = weights_bound(cfg, arms)
    if not embedded and not cfg.calibration and (entry != "G9/real" or bound != "real"):
        raise EvidenceError(
            f"G9 judges real files ({cfg.dataset}) only under G9/real, with pinned, digest-verified weights for every "
            f"arm; missing: {why}" if entry == "G9/real" else
            f"--lock-entry {entry}: G9 judges real files ({cfg.dataset}) only under G9/real (its other entries "
            "judge phantoms)")
    run = Run.for_gate("G9", cfg, command=command, default_entry=entry, upper=(bound, why))
    if run.entry_key != entry:  # for_gate follows the same rule; a disagreement is a bug, not a user error
        raise RuntimeError(f"G9 opened {run.entry_key}, expected {entry}")
    overridden = bool(cfg.classifier_config)
    check_config_digests(run.parameters, arms, overridden=overridden)
    if overridden:
        configured = arms["configured"]
        run.notes.append(f"configured arm overridden on the command line: {configured.doc['name']} with backbone "
                         f"{configured.backbone['name']} (config digest {configured.digest})")
    return run, arms


def config_digests(arms: dict) -> dict[str, str]:
    """Digests of the three arm configs (each with its feature schema inlined), as locked in the gate entry."""
    return {name: arm.digest for name, arm in sorted(arms.items())}


def check_config_digests(params: Any, arms: dict, *, overridden: bool) -> None:
    """The arm configs must be the ones the lock entry was locked with (unless the run overrides the config, which
    is then recorded); a config edited after locking fails before any data is read."""
    locked = params.get("config_digests")
    if locked is None:
        return  # calibration runs read the gate template, which carries no digests yet
    now = config_digests(arms)
    bad = sorted(k for k in locked if now.get(k) != locked[k] and not (overridden and k in ("configured", "full")))
    if bad or set(locked) != set(now):
        from ..lock import LockError

        raise LockError(f"classifier config(s) {bad or sorted(set(locked) ^ set(now))} differ from the digests "
                        f"locked in parameters/config_digests; re-lock through covtoken thresholds, or pass "
                        f"--classifier-config explicitly (recorded)")


def load_arms(cfg: Any, run: Any, data: Any, arms: dict) -> tuple[Any, dict]:
    from ..data.splits import split_patients, validate_splits
    from .experiment import fit_stage

    P = run.parameters
    splits = split_patients([it.patient_id for it in data.items], fractions=P["split_fractions"], seed=cfg.seed)
    validate_splits(splits, data.items)
    weights = {"configured": cfg.weights, "full": cfg.weights, "baseline": cfg.baseline_weights}
    revisions = {"configured": cfg.revision, "full": cfg.revision, "baseline": cfg.baseline_revision}
    fit = fit_stage(data, splits, arms, seed=cfg.seed, device=cfg.device, weights=weights, revisions=revisions,
                    batch_size=cfg.batch_size, on_backbone=lambda arm, bb: run.check_weights(bb))
    return fit, splits


def finish_g9(cfg: Any, run: Any, data: Any, fit: Any, splits: dict) -> Path:
    from ..data.splits import SplitManifest
    from ..eval.classification import open_class_labels
    from ..eval.g9 import G9Result, g9_arrays
    from .calibrate import conformal_sets
    from .predictor import save_model_dir
    from .backbones import get_classifier_spec
    from ..eval.classification import softmax
    from ..backbone.frozen import state_dict_digest

    P = run.parameters
    head = fit.arms["configured"]
    ccfg = head.cfg
    labels = ccfg.labels
    cls = ccfg.doc["classes"]
    cal = fit.calibration
    # Calibration labels again (role calibrate) for the crepes sets; test labels (role judge) only from here on.
    y_cal = open_class_labels(data.masks, fit.ids["calib"], key=cls["label_key"], classes=labels, other=labels[-1])
    p_cal = softmax(head.logits["calib"], cal.temperature)
    p_test = softmax(head.logits["test"], cal.temperature)
    alpha = cal.conformal_alpha
    sets = conformal_sets(p_cal, y_cal, p_test, alpha)
    qsets = (1.0 - p_test <= cal.conformal_qhat).astype(np.int64)
    if not np.array_equal(sets, qsets):
        raise RuntimeError(f"crepes prediction sets and the stored conformal quantile disagree on "
                           f"{int((sets != qsets).any(axis=1).sum())} test images; the served sets would differ")
    y_test = open_class_labels(data.masks, fit.ids["test"], key=cls["label_key"], classes=labels, other=labels[-1])
    # every record metric comes out of the named recipe; its inputs are stored for the audit to recompute
    ev = run.evaluate("g9.classifier", g9_arrays(
        logits={a: arm.logits["test"] for a, arm in fit.arms.items()},
        tta_logits=[head.logits[f"test/{v}"] for v in ccfg.doc["tta"]], y=y_test, patients=fit.patients["test"],
        prediction_sets=sets), {
        "labels": labels, "temperature": cal.temperature,
        "abstain_threshold": cal.abstain_threshold if np.isfinite(cal.abstain_threshold) else None,
        "alpha": alpha, "n_calibration": cal.n_images, "top_k": int(ccfg.doc["top_k"]), "n_boot": int(P["n_boot"]),
        "ci_level": float(P["ci_level"]), "seed": cfg.seed})
    res = G9Result(ev.metrics, ev.extras)
    model = head.trained.model
    spec = get_classifier_spec(ccfg.backbone["name"])
    bb = model.backbone
    backbone_prov = {"registry": "classifier", "name": spec.name, "library": spec.library, "hub_id": spec.hub_id,
                     "revision": bb.source.get("resolved_revision") or spec.revision,
                     "pinned_revision": spec.revision, "revision_pinned": spec.revision_pinned,
                     "resolved_revision": bb.source.get("resolved_revision"),
                     "weights_digest": state_dict_digest(model), "weights_note": "digest of the trained classifier "
                     "(EMA weights); the backbone's starting weights are in weights_origin/weights_files",
                     "weights_origin": bb.source.get("origin"), "weights_files": bb.source.get("files", {}),
                     "block_index_base": 0, "blocks": [0], "final_norm": True, "num_prefix_tokens_stripped": 0,
                     "feature": "pooled image feature (SigLIP MAP head / timm global pool), fine-tuned",
                     "preprocess": bb.data_config, "arms": {a: {"config": arm.cfg.doc["name"],
                                                                "config_digest": arm.cfg.digest,
                                                                "backbone": arm.cfg.backbone["name"],
                                                                "feature_schema": arm.cfg.feature_schema.name
                                                                if arm.cfg.feature_schema else None,
                                                                "used_ema": arm.trained.used_ema,
                                                                "bf16": arm.trained.bf16,
                                                                "grad_checkpointing": arm.trained.grad_checkpointing,
                                                                "weights": arm.trained.model.backbone.weights_facts()}
                                                            for a, arm in fit.arms.items()}}
    split = SplitManifest(cfg.seed, dict(P["split_fractions"]), splits)
    dataset_prov = split.dataset_provenance(
        data.provenance, roles={"fit": "train", "calibrate": "calib", "judge": "test"}, calibration=cfg.calibration,
        n_images={k: len(v) for k, v in fit.ids.items()}, n_train_images_after_other_sampling=len(fit.train_rows))
    if cfg.calibration:
        return run.write_calibration(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)
    run.artefacts.json("calibration.json", cal.as_dict(),
                       description="temperature, conformal quantile and abstain threshold (calibration patients)")
    run.artefacts.json("g9_tables.json", res.tables,
                       description="per-class recall, confusion matrix and risk-coverage curve on test patients")
    run.artefacts.json("training.json", {a: arm.trained.history for a, arm in fit.arms.items()},
                       description="loss per epoch of every arm (frozen-head then fine-tune stages)")
    run.artefacts.json("splits.json", split.to_dict(), description="patient membership of each split")
    run.artefacts.bytes("confusion_matrix.png", render_confusion(res.tables),
                        description="confusion matrix of the configured model on test patients")
    run.artefacts.bytes("risk_coverage.png", render_risk_coverage(res.tables),
                        description="selective risk vs coverage of the configured model on test patients")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        metrics_doc = {"run_id": run.run_id, "gate_id": "G9", "metrics": res.metrics}
        save_model_dir(model_dir, model=model, cfg=ccfg, calibration=cal, metrics=metrics_doc, run_id=run.run_id)
        for f in sorted(model_dir.iterdir()):
            run.artefacts.bytes(f.name, f.read_bytes(), description=f"deployable classifier: {f.name} "
                                "(Predictor.from_dir on this artefact folder)")
    if not res.tables["conformal_in_band"]:
        run.notes.append("conformal test coverage lies outside its 99% finite-sample band for exchangeable data")
    run.notes.append(f"TTA ({', '.join(ccfg.doc['tta'])}) is reported as a paired difference (delta_top1_tta), "
                     "never in the headline top1")
    return run.finish(metrics=res.metrics, backbone=backbone_prov, dataset=dataset_prov)


def _png(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render_confusion(tables: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(tables["confusion"], dtype=float)
    labels = tables["labels"]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 0.8 + 0.55 * len(labels)))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (test patients)")
    return _png(fig)


def render_risk_coverage(tables: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc = tables["risk_coverage"]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(rc["coverage"], 1 - np.asarray(rc["risk"]), lw=1.5)
    ax.set_xlabel("coverage (1 - abstention rate)")
    ax.set_ylabel("selective top-1 accuracy")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    return _png(fig)
