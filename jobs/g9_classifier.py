# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""G9 - a config-driven, deployable lesion classifier (image + patient questionnaire) with calibrated abstain.

One classifier config (configs/classifier/*.json, validated by configs/classifier.schema.json) drives the backbone,
the metadata branch (feature_schema.json), the head, the recipe (frozen-head epochs, then fine-tuning with
layer-wise LR decay, AdamW + cosine and weight EMA; bf16 + gradient checkpointing on GPU), the class list with a
sampled "other", TTA views and the abstain settings. Three arms are trained on training patients: the configured
model (reduced questionnaire; the deployed one), the same with the full questionnaire (C2), and the baseline config
(ResNet-50 + the reduced questionnaire; C1). Temperature, conformal quantile (crepes) and abstain threshold are
fitted on calibration patients; test patients are judged with patient-clustered bootstrap CIs. The deployable
folder (model.safetensors, config.json, labels.txt, feature_schema.json, metrics.json) is written as an artefact and
served by covtoken.classifier.predictor.Predictor.from_dir.

Run locally (embedded default: derm class phantoms + seeded mini architectures, 2 CPU cores, about 2 minutes):
    covtoken run jobs/g9_classifier.py --smoke
    python jobs/g9_classifier.py --smoke --results results/local        # the same, without the launcher

On real data (HAM10000 with age/sex/site; MedSigLIP-448 vs ResNet-50) as an HF Job:
    covtoken submit jobs/g9_classifier.py --flavor a100-large --timeout 6h --results-repo org/covtoken-results \\
        -- --dataset ham10000 --data-root /data/ham10000 --device cuda
Real files are judged only under G9/real, which needs every arm's weights pinned and digest-verified (the rule of
covtoken.evidence, read from covtoken.classifier.backbones). MedSigLIP-448 and ResNet-50 pin a commit; ResNet-50
records a weight digest, MedSigLIP-448 does not yet, so the run above is refused in one line (exit 2, before any
data or download) until its model.safetensors sha256 is recorded in the registry. --weights / --baseline-weights
take local snapshot folders instead; --revision / --baseline-revision name a commit (required for entries registered
with revision_pinned=False, e.g. convnextv2-tiny; a commit other than the pinned one is never real evidence).

Calibration (checks the flow on calibration patients; never judged):
    python jobs/g9_classifier.py --smoke --calibration --results results/calibration-G9
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from covtoken.runner import JobConfig, job_main, load_gate_dataset, stage, torch_threads


@dataclass(frozen=True)
class G9Config(JobConfig):
    dataset: str = field(default="phantom-derm-classes", metadata={"help": "dataset name or source"})
    data_root: str | None = field(default=None, metadata={"help": "folder of a file-based dataset (ham10000)"})
    classifier_config: str | None = field(default=None, metadata={
        "help": "classifier config JSON (default: the locked entry's classifier_config)"})
    baseline_weights: str | None = field(default=None, metadata={"help": "local snapshot folder of the baseline"})
    baseline_revision: str | None = field(default=None, metadata={"help": "Hub commit sha of the baseline weights"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads (0: leave the default)"})


def main(argv: list[str] | None = None) -> int:
    return job_main(G9Config, run_g9, script="jobs/g9_classifier.py", doc=__doc__, argv=argv,
                    smoke={"dataset": "phantom-derm-classes", "device": "cpu"})


def run_g9(cfg: G9Config, *, command: list[str]) -> int:
    from covtoken.classifier.report import finish_g9, load_arms, open_g9_run

    with torch_threads(cfg.threads):
        run, arms = open_g9_run(cfg, command=command)   # configs validated and the lock checked before any data
        data = load_gate_dataset(cfg, run.parameters, dataset=cfg.dataset, root=cfg.data_root)
        with stage("fit_and_calibrate", arms=sorted(arms)):
            fit, splits = load_arms(cfg, run, data, arms)
        path = finish_g9(cfg, run, data, fit, splits)
        logging.getLogger("covtoken.g9").info("record: %s", path)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
