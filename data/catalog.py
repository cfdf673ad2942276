"""Dataset names the jobs accept, each mapped to a loader that returns the common layout.

``phantom-ct``, ``phantom-us`` and ``phantom-derm`` are generated from a seed (the embedded default).
Real sources are added by their adapters (BUSI, LIDC-IDRI, KiTS23, MSD, Hub datasets). Unknown names raise
with the list of choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .layout import EvalMasks, ImageItem
from .phantoms import ct_phantoms, derm_phantoms, us_phantoms

__all__ = ["LoadedDataset", "load_dataset", "list_datasets", "register_dataset", "is_embedded"]


@dataclass(frozen=True)
class LoadedDataset:
    """Items in the common layout, their sealed masks, and where they came from.

    ``provenance`` has at least ``id`` and ``revision`` (a Hub commit, a file digest, or the generator seed).
    """

    items: list[ImageItem]
    masks: EvalMasks
    provenance: dict[str, Any] = field(default_factory=dict)


Loader = Callable[..., LoadedDataset]
_DATASETS: dict[str, Loader] = {}


def register_dataset(name: str, loader: Loader) -> None:
    """Register ``loader(**options) -> LoadedDataset`` under ``name`` (once)."""
    if name in _DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    _DATASETS[name] = loader


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def is_embedded(name: str) -> bool:
    """True for the synthetic phantoms of the embedded default."""
    return name.startswith("phantom-")


def load_dataset(name: str, **options: Any) -> LoadedDataset:
    """Load dataset ``name`` with loader-specific ``options`` (seed, sizes, paths...)."""
    try:
        loader = _DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}") from None
    return loader(**options)


def _phantom(kind: str, fn: Callable[..., tuple[list[ImageItem], EvalMasks]], per_patient_key: str) -> Loader:
    def load(*, seed: int = 0, n_patients: int = 60, per_patient: int = 4, size: int = 128) -> LoadedDataset:
        items, masks = fn(n_patients=n_patients, seed=seed, size=size, **{per_patient_key: per_patient})
        return LoadedDataset(items, masks, {"id": f"phantom-{kind}", "revision": f"generator-seed-{seed}",
                                            "source": f"covtoken.data.phantoms.{fn.__name__}",
                                            "n_patients": n_patients, "images_per_patient": per_patient,
                                            "size": size})
    return load


register_dataset("phantom-ct", _phantom("ct", ct_phantoms, "slices_per_patient"))
register_dataset("phantom-us", _phantom("us", us_phantoms, "images_per_patient"))
register_dataset("phantom-derm", _phantom("derm", derm_phantoms, "lesions_per_patient"))
