"""Dataset names the jobs accept, each mapped to a loader that returns the common layout.

* ``phantom-ct``, ``phantom-ct3d`` (volumes: contiguous slices per patient), ``phantom-kidney``, ``phantom-us``,
  ``phantom-derm``: generated from a seed (the embedded default).
* ``busi`` and ``lidc`` (option ``root``): the BUSI and LIDC-IDRI folder layouts, e.g. the samples in
  ``../shared/realdata``; their revision is a digest of every file read.
* ``folder`` (option ``root``): any folder of images + masks (+ optional ``index.csv``) with a ``dataset.json``
  giving its name, licence and modality (:mod:`covtoken.data.folder`).
* any other source with a ``/`` - a materialized local folder, ``org/name`` or ``hf://datasets/org/name[@rev]/sub`` -
  goes through Hugging Face ``datasets`` (:mod:`covtoken.data.hub`) with the same code for all three.

Unknown names raise with the list of choices.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .identity import is_registered_sample
from .layout import EvalMasks, ImageItem
from .phantoms import ct_phantoms, ct_volume_phantoms, derm_phantoms, kidney_phantoms, us_phantoms

__all__ = ["LoadedDataset", "load_dataset", "list_datasets", "register_dataset", "is_embedded",
           "is_registered_sample"]


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
    if name not in _DATASETS and "/" in name:
        return _hub_dataset(name, **options)
    try:
        loader = _DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}, "
                       "or a local folder / org/name / hf://datasets/... source") from None
    params = inspect.signature(loader).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:  # e.g. a data root given for a generated phantom: say so instead of a TypeError
            raise ValueError(f"dataset {name!r} takes no option {', '.join(unknown)} "
                             f"(it takes: {', '.join(params) or 'none'})")
    return loader(**options)


def folder_digest(root: Path, files: list[Path]) -> str:
    """sha256 over the relative paths and bytes of ``files`` under ``root``: the revision of a local dataset."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (--data-root)")
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {name!r}: root {path} is not a folder")
    return path


def _files_read(root: Path, items: list[ImageItem], masks: EvalMasks) -> list[Path]:
    """Top-level files of ``root`` (index tables, archives) and every image and mask file the items came from."""
    files = {p for p in root.iterdir() if p.is_file()}
    for src in [it.source for it in items] + [m.source for m in masks.values()]:
        p = Path(src)
        if p.is_file():
            files.add(p)
    return sorted(files)


def _folder_dataset(name: str, module: str, function: str, info: dict[str, str]) -> Loader:
    """A loader for a dataset kept as files under one root folder; its revision is the digest of the files read."""
    def load(*, root: str | Path | None = None, **options: Any) -> LoadedDataset:
        import importlib

        from .identity import IDENTITIES, check_identity

        path = _require_root(name, root)
        fn = getattr(importlib.import_module(module, __package__), function)
        # the loader's own options (e.g. KiTS23's slice_every) reach it; others (a phantom entry's n_patients, when
        # a flow check runs on real files under an embedded entry) do not apply to files and are not passed
        accepted = set(inspect.signature(fn).parameters) - {"root"}
        own = {k: v for k, v in options.items() if k in accepted}
        items, masks = fn(path, **own)
        identity = IDENTITIES.get(name)
        if identity is not None:
            check_identity(name, items, identity)  # wrong data stops here, naming the file
        revision = folder_digest(path, _files_read(path, items, masks))
        return LoadedDataset(items, masks, {"id": info.get("id", name), "revision": revision, "source": str(path),
                                            **{k: v for k, v in info.items() if k != "id"},
                                            **content_facts(name, items, masks, root=path),
                                            **({"identity": identity.describe()} if identity else {})})
    return load


def content_facts(name: str, items: list[ImageItem], masks: EvalMasks, *, root: str | Path | None) -> dict[str, Any]:
    """Provenance facts every loader adds: catalog name, content digest, image and lesion-free counts, and the
    registered sample the content is (if any)."""
    from .identity import content_digest, registered_sample
    from .layout import unseal

    digest, basis = content_digest(items, root)
    facts: dict[str, Any] = {"catalog_name": name, "content_digest": digest, "content_digest_basis": basis,
                             "n_images": len(items),
                             "n_lesion_free_images": sum(1 for k in masks if not unseal(masks[k]).any())}
    sample = registered_sample(name, digest)
    if sample is not None:
        facts["registered_sample"] = sample
    return facts


_FOLDER_DATASETS = {
    "busi": (".busi", "load_busi", {"licence": "CC0 1.0 (Kaggle re-upload of BUSI)",
                                    "citation": "Al-Dhabyani et al., Data in Brief 28:104863, 2020",
                                    "note": "BUSI has no patient ids: each image is its own patient"}),
    "lidc": (".lidc", "load_lidc", {"id": "lidc-idri", "licence": "CC BY 3.0 (TCIA)",
                                    "citation": "Armato et al., Med Phys 38(2):915, 2011"}),
    "lidc-xml": (".lidc_xml", "load_lidc_xml", {"id": "lidc-idri-xml", "licence": "CC BY 3.0 (TCIA)",
                                                "citation": "Armato et al., Med Phys 38(2):915, 2011",
                                                "note": "original DICOM + LIDC XML; masks are 50% reader consensus"}),
    "lung-pet-ct-dx": (".lung_pet_ct_dx", "load_lung_pet_ct_dx", {
        "licence": "CC BY 4.0 (TCIA)", "citation": "Li et al., Lung-PET-CT-Dx, TCIA, doi:10.7937/TCIA.2020.NNC20461",
        "note": "masks are filled bounding boxes"}),
    "ham10000": (".ham10000", "load_ham10000", {
        "licence": "CC BY-NC 4.0 (HAM10000); ISIC 2018 task 1 masks CC BY-NC 4.0",
        "citation": "Tschandl et al., Sci Data 5:180161, 2018; Codella et al., arXiv:1902.03368",
        "note": "sampling unit = lesion_id"}),
    "kits23": (".volumes", "load_kits23", {"licence": "CC BY-NC-SA 4.0 (KiTS23)",
                                            "citation": "Heller et al., KiTS23 challenge, arXiv:2307.01984"}),
    "msd-liver": (".volumes", "load_msd_liver", {"licence": "CC BY-SA 4.0 (MSD)",
                                                  "citation": "Antonelli et al., Nat Commun 13:4128, 2022"}),
    "msd-pancreas": (".volumes", "load_msd_pancreas", {"licence": "CC BY-SA 4.0 (MSD)",
                                                        "citation": "Antonelli et al., Nat Commun 13:4128, 2022"}),
}


def _hub_dataset(source: str, *, revision: str | None = None, layout: str = "covtoken", **_: Any) -> LoadedDataset:
    """A materialized dataset (configs ``images`` + ``masks``) or, with ``layout="imagefolder"``, one imagefolder
    whose rows carry ``mask_file_name`` - from a local folder, ``org/name`` or ``hf://datasets/...``."""
    from .hub import load_items, parse_source
    from .materialize import load_hub_layout

    src = parse_source(source, revision=revision)
    if src.is_local and layout == "covtoken" and not (Path(src.path) / (src.data_dir or "") / "images"
                                                      / "metadata.jsonl").is_file():
        from .errors import DataError

        raise DataError(f"{source}: not a covtoken dataset folder (no images/metadata.jsonl from the materialize "
                        "job); for a plain folder of images and masks use --dataset folder --data-root "
                        f"{source} with a dataset.json naming it, its licence and modality (see covtoken.data.folder)")
    if layout == "covtoken":
        items, masks = load_hub_layout(source, revision=revision)
    elif layout == "imagefolder":
        items, masks = load_items(source, revision=revision)
    else:
        raise ValueError(f"{source}: unknown layout {layout!r}; use 'covtoken' or 'imagefolder'")
    if src.is_local:
        root = Path(src.path)
        rev = folder_digest(root, [p for p in root.rglob("*") if p.is_file()])
    else:
        rev = src.revision
        if rev is None or len(rev) != 40:
            raise ValueError(f"{source}: pin the dataset to a commit sha (...@<sha> or --revision) for a judged run")
    return LoadedDataset(items, masks, {"id": src.path if not src.is_local else f"local:{Path(src.path).name}",
                                        "revision": rev, "source": source,
                                        **content_facts(source, items, masks,
                                                        root=Path(src.path) if src.is_local else None)})


def _generic_folder(*, root: str | Path | None = None, **_: Any) -> LoadedDataset:
    """``--dataset folder``: images + masks + optional index.csv with a user-given name and licence
    (:mod:`covtoken.data.folder`)."""
    from .folder import load_folder

    path = _require_root("folder", root)
    items, masks, info = load_folder(path)
    revision = folder_digest(path, _files_read(path, items, masks))
    return LoadedDataset(items, masks, {"id": f"folder:{info['name']}", "revision": revision, "source": str(path),
                                        "licence": info["licence"], "citation": info.get("citation", "not given"),
                                        "licence_given_by": "user (dataset.json)",
                                        **content_facts("folder", items, masks, root=path),
                                        "identity": {"modality": info["modality"], "channels": info["channels"],
                                                     "declared_by": "user (dataset.json)"}})


def _phantom(kind: str, fn: Callable[..., tuple[list[ImageItem], EvalMasks]], per_patient_key: str) -> Loader:
    def load(*, seed: int = 0, n_patients: int = 60, per_patient: int = 4, size: int = 128) -> LoadedDataset:
        items, masks = fn(n_patients=n_patients, seed=seed, size=size, **{per_patient_key: per_patient})
        return LoadedDataset(items, masks, {"id": f"phantom-{kind}", "revision": f"generator-seed-{seed}",
                                            "source": f"covtoken.data.phantoms.{fn.__name__}",
                                            "n_patients": n_patients, "images_per_patient": per_patient,
                                            "size": size, **content_facts(f"phantom-{kind}", items, masks, root=None)})
    return load


register_dataset("phantom-ct", _phantom("ct", ct_phantoms, "slices_per_patient"))
register_dataset("phantom-ct3d", _phantom("ct3d", ct_volume_phantoms, "slices_per_patient"))
register_dataset("phantom-kidney", _phantom("kidney", kidney_phantoms, "slices_per_patient"))
register_dataset("phantom-us", _phantom("us", us_phantoms, "images_per_patient"))
register_dataset("phantom-derm", _phantom("derm", derm_phantoms, "lesions_per_patient"))
register_dataset("folder", _generic_folder)


def _load_derm_classes(*, seed: int = 0, n_patients: int = 200, per_patient: int = 2, size: int = 64) -> LoadedDataset:
    from .derm_classes import derm_class_phantoms

    items, masks = derm_class_phantoms(n_patients=n_patients, lesions_per_patient=per_patient, size=size, seed=seed)
    return LoadedDataset(items, masks, {"id": "phantom-derm-classes", "revision": f"generator-seed-{seed}",
                                        "source": "covtoken.data.derm_classes.derm_class_phantoms",
                                        "n_patients": n_patients, "images_per_patient": per_patient, "size": size,
                                        **content_facts("phantom-derm-classes", items, masks, root=None)})


register_dataset("phantom-derm-classes", _load_derm_classes)
for _name, (_module, _function, _info) in _FOLDER_DATASETS.items():
    register_dataset(_name, _folder_dataset(_name, _module, _function, _info))


def dataset_info(name: str) -> dict[str, Any]:
    """What the catalog knows about ``name`` without loading it: kind, id, revision rule, licence, citation, note."""
    if name not in _DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    if is_embedded(name):
        return {"name": name, "kind": "embedded phantom (generated)", "id": name, "revision": "generator-seed-<seed>",
                "licence": "Apache-2.0 (generated by the kit)", "citation": "", "note": "no download"}
    module, _function, info = _FOLDER_DATASETS.get(name, ("", "", {}))
    return {"name": name, "kind": "local folder (--data-root)" if module else "registered loader",
            "id": info.get("id", name), "revision": "sha256 of the files read (folder digest)",
            "licence": info.get("licence", "unknown"), "citation": info.get("citation", ""),
            "note": info.get("note", "")}
