"""Data checks a gate job runs right after loading, before any backbone or token work.

:func:`run_data_checks` (called by ``covtoken.runner.load_gate_dataset``) does, in order:

1. **near-duplicate grouping** (:mod:`covtoken.data.dedup`) with the locked ``near_duplicate`` parameter (the
   default ``{"method": "phash", "hash_size": 8, "max_hamming": 6}`` when the entry has none): patients that share
   a near-duplicate image become one split unit (their items get the unit as ``patient_id``; the source patient
   id stays in ``meta["source_patient_id"]``), and the groups, the label conflicts among them and the unit count
   go into the dataset provenance. On the synthetic phantoms the grouping is computed and reported but not
   applied: their patients are independent by construction, and the templated anatomy makes perceptual hashes
   of different patients collide (measured: phantom-kidney collapses into one group);
2. **split sizes**: the job's own split (``split_patients`` over the units with the locked ``split_fractions``
   and the run's seed - the same deterministic call the job makes next) must give every judged split (every
   split but ``train``) at least ``min_patients_per_judged_split`` units. An entry without that parameter gets
   the cluster bootstrap's hard minimum of 2 and a warning. Below it the job stops with one line
   (:class:`~covtoken.data.errors.TooFewPatientsError`, exit status 2): nothing is judged on a bootstrap CI over
   fewer clusters;
3. a last check that no near-duplicate group straddles that split (:func:`~covtoken.data.dedup.validate_groups`).

Dataset identity (modality, channels, naming, count, content digest) is checked by the catalog's loaders
themselves (:mod:`covtoken.data.identity`), so it has already run when this module sees the data.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from .catalog import LoadedDataset
from .dedup import NearDuplicateParams, group_near_duplicates, validate_groups
from .errors import DataError, TooFewPatientsError
from .layout import unseal_labels
from .splits import split_patients

__all__ = ["run_data_checks", "min_patients_rule", "judged_splits", "check_split_sizes", "apply_near_duplicates",
           "BOOTSTRAP_MIN_CLUSTERS", "FIT_SPLIT"]

log = logging.getLogger(__name__)

#: a patient-clustered bootstrap cannot run on fewer clusters than this
BOOTSTRAP_MIN_CLUSTERS = 2
#: the split that fits (label-free construction); every other split selects, calibrates or judges
FIT_SPLIT = "train"
_CLASS_LABELS = ("diagnosis", "dx", "label")


def min_patients_rule(params: Mapping[str, Any]) -> tuple[int, str | None]:
    """The minimum number of patients per judged split, and a warning when the entry does not lock one.

    Raises:
        DataError: a locked value that is not an integer >= 2.
    """
    if "min_patients_per_judged_split" not in params:
        return BOOTSTRAP_MIN_CLUSTERS, ("the lock entry has no min_patients_per_judged_split; using the cluster "
                                        f"bootstrap's hard minimum of {BOOTSTRAP_MIN_CLUSTERS} patients per judged split")
    value = params["min_patients_per_judged_split"]
    if not isinstance(value, int) or isinstance(value, bool) or value < BOOTSTRAP_MIN_CLUSTERS:
        raise DataError(f"locked parameter min_patients_per_judged_split must be an integer >= "
                        f"{BOOTSTRAP_MIN_CLUSTERS}, got {value!r}")
    return value, None


def judged_splits(fractions: Mapping[str, float]) -> list[str]:
    """Every split with a positive fraction except the fit split ``train``."""
    return [name for name, f in fractions.items() if name != FIT_SPLIT and f > 0]


def check_split_sizes(splits: Mapping[str, frozenset[str] | set[str]], *, minimum: int, judged: list[str],
                      dataset: str) -> None:
    """Stop when a judged split has fewer than ``minimum`` patients (split units).

    Raises:
        TooFewPatientsError: one line naming the dataset, the split, its size and the locked key.
    """
    for name in judged:
        n = len(splits.get(name, ()))
        if n < minimum:
            sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
            raise TooFewPatientsError(
                f"dataset {dataset!r}: judged split {name!r} has {n} patient(s) (splits: {sizes}); the lock requires "
                f"at least {minimum} per judged split (min_patients_per_judged_split) before anything is judged on "
                "a patient-clustered bootstrap CI; use more patients")


def _class_labels(data: LoadedDataset) -> dict[str, str] | None:
    """Image id -> class label (``diagnosis``/``dx``/``label``), or None when the dataset has none."""
    labels: dict[str, str] = {}
    for image_id, mask in data.masks.items():
        lab = unseal_labels(mask)
        key = next((k for k in _CLASS_LABELS if lab.get(k) not in (None, "")), None)
        if key is None:
            return None
        labels[image_id] = str(lab[key])
    return labels


def apply_near_duplicates(data: LoadedDataset, params: Mapping[str, Any], *, apply: bool = True
                          ) -> tuple[LoadedDataset, Any]:
    """Group near-duplicates; with ``apply``, make each group's patients one split unit.

    Returns:
        ``(dataset, report)``: the dataset with unit patient ids and a ``near_duplicates`` provenance block.
    """
    nd = NearDuplicateParams.from_mapping(params.get("near_duplicate"), where="locked parameter near_duplicate")
    labels = _class_labels(data)
    report = group_near_duplicates(data.items, nd, labels=labels)
    block = {**report.provenance(), "applied": apply,
             "label_source": "class label sealed with the masks" if labels is not None else None}
    if labels is None:
        block["n_label_conflicts"] = None
    if not apply:
        block["why_not_applied"] = ("synthetic phantoms: patients are independent by construction (generator seed); "
                                    "groups are reported only")
        return dataclasses.replace(data, provenance={**data.provenance, "near_duplicates": block}), report
    items = [it if report.unit_of[it.patient_id] == it.patient_id else dataclasses.replace(
        it, patient_id=report.unit_of[it.patient_id], meta={**it.meta, "source_patient_id": it.patient_id})
        for it in data.items]
    if report.groups:
        conflicts = "no class label" if labels is None else f"{block['n_label_conflicts']} label conflict(s)"
        log.warning("%s: %d near-duplicate group(s) over %d images; %d patients -> %d split units; %s",
                    data.provenance.get("id"), len(report.groups), block["n_images_in_groups"],
                    block["n_patients"], block["n_split_units"], conflicts)
    prov = {**data.provenance, "near_duplicates": block, "split_unit": "patient + near-duplicate group"}
    return LoadedDataset(items, data.masks, prov), report


def run_data_checks(data: LoadedDataset, params: Mapping[str, Any], *, seed: int, dataset: str,
                    embedded: bool) -> LoadedDataset:
    """The checks every gate job runs right after loading (see the module docstring).

    Args:
        data: the loaded dataset.
        params: the locked protocol parameters (``split_fractions``, ``near_duplicate``,
            ``min_patients_per_judged_split``).
        seed: the run's split seed.
        dataset: the name the user gave (for messages).
        embedded: synthetic phantoms (grouping reported, not applied).

    Returns:
        The dataset with split-unit patient ids and provenance blocks ``near_duplicates`` and ``data_checks``.
    """
    data, report = apply_near_duplicates(data, params, apply=not embedded)
    minimum, warning = min_patients_rule(params)
    if warning:
        log.warning("%s", warning)
    fractions = params.get("split_fractions")
    checks: dict[str, Any] = {"min_patients_per_judged_split": minimum,
                              "min_patients_source": "lock" if warning is None else "bootstrap hard minimum (warning)"}
    if fractions:
        units = [it.patient_id for it in data.items]
        judged = judged_splits(fractions)
        try:
            splits = split_patients(units, fractions=fractions, seed=seed)
        except ValueError as exc:
            raise TooFewPatientsError(f"dataset {dataset!r}: {exc} (split fractions {dict(fractions)}); the lock "
                                      f"requires at least {minimum} patients per judged split") from None
        check_split_sizes(splits, minimum=minimum, judged=judged, dataset=dataset)
        if not embedded:
            validate_groups(splits, data.items, report.groups)
        checks.update(judged_splits=judged, n_units_per_split={k: len(v) for k, v in splits.items()})
    if warning:
        checks["warning"] = warning
    return dataclasses.replace(data, provenance={**data.provenance, "data_checks": checks})
