"""Trainable image backbones of the lesion classifier (G9), registered by name, each with its library's own
preprocessing.

Unlike :mod:`covtoken.backbone.registry` (frozen ViTs read token by token), a classifier backbone is fine-tuned and
only its pooled image feature is used, so CNNs fit as well. An entry names the library, the architecture, the Hub
repository and revision; the builder returns a :class:`FeatureBackbone` whose ``data_config`` (input size, mean,
std) is read from the library's own processor configuration:

* transformers SigLIP vision tower (``medsiglip-448``): ``SiglipVisionModel`` + ``SiglipImageProcessor`` from the
  snapshot's ``config.json`` / ``preprocessor_config.json``; the feature is the MAP-head ``pooler_output``.
* timm (``resnet50``, ``convnextv2-tiny``): ``timm.create_model("local-dir:<snapshot>", pretrained=True)`` with
  ``num_classes=0``; mean/std/size from ``timm.data.resolve_model_data_config`` (the snapshot's pretrained_cfg).

Hub snapshots are fetched with the Hub client at an explicit 40-hex commit (``revision=``; no commit of these
repositories could be established offline, so none is pinned and a run must name one) or read from a local folder
(``weights=``), through the same code. The ``*-mini`` entries are the embedded default: the same architectures,
shrunk, from a fixed seed, needing no download.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["ClassifierBackboneSpec", "FeatureBackbone", "build_feature_backbone", "get_classifier_spec",
           "list_classifier_backbones", "rebuild_feature_backbone", "MINI_SEED"]

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
MINI_SEED = 0


@dataclass(frozen=True)
class ClassifierBackboneSpec:
    """A registry entry. ``arch`` is the timm model name, or ``"siglip-vision"``; ``mini`` holds the shrunk
    architecture of an embedded entry (built from :data:`MINI_SEED`, no Hub id)."""

    name: str
    library: str                       # "timm" | "transformers"
    arch: str
    hub_id: str | None
    revision: str | None = None
    mini: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if self.library not in ("timm", "transformers"):
            raise ValueError(f"{self.name}: library must be timm or transformers, got {self.library!r}")
        if self.revision is not None and not COMMIT_SHA.fullmatch(self.revision):
            raise ValueError(f"{self.name}: revision must be a 40-hex commit sha, got {self.revision!r}")
        if (self.hub_id is None) == (not self.mini):
            raise ValueError(f"{self.name}: an entry has either a Hub id or a mini architecture")


_REGISTRY: dict[str, ClassifierBackboneSpec] = {}


def _register(spec: ClassifierBackboneSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"classifier backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def list_classifier_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_classifier_spec(name: str) -> ClassifierBackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown classifier backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


class FeatureBackbone(nn.Module):
    """``forward(pixels (B, 3, S, S)) -> (B, num_features)``, with its preprocessing and layer groups.

    Attributes:
        model: the library module (transformers ``SiglipVisionModel`` or timm model with ``num_classes=0``).
        kind: ``"siglip"`` or ``"timm"``.
        num_features: feature width.
        data_config: ``{"input_size": [3, S, S], "mean": [...], "std": [...], "interpolation": ...}``.
        arch_config: what :func:`rebuild_feature_backbone` needs to rebuild the architecture without the Hub.
        source: where the weights came from (origin, revision, file digests).
    """

    def __init__(self, model: nn.Module, *, kind: str, num_features: int, data_config: dict, arch_config: dict,
                 source: dict) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.num_features = int(num_features)
        self.data_config = data_config
        self.arch_config = arch_config
        self.source = source

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "siglip":
            return self.model(pixel_values=pixels).pooler_output
        return self.model(pixels)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes over this module's parameter names (prefix ``model.``) for timm's layer-wise LR decay."""
        if self.kind == "siglip":
            return {"stem": r"^model\.(?:vision_model\.)?embeddings",
                    "blocks": [(r"^model\.(?:vision_model\.)?encoder\.layers\.(\d+)", None)]}
        inner = self.model.group_matcher(coarse=coarse)
        out: dict[str, Any] = {}
        for k, v in inner.items():
            if isinstance(v, str):
                out[k] = _prefix(v)
            else:
                out[k] = [(_prefix(rx), rest) for rx, rest in v]
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.kind == "siglip":
            if enable:
                self.model.gradient_checkpointing_enable()
            else:
                self.model.gradient_checkpointing_disable()
        else:
            self.model.set_grad_checkpointing(enable)


def _prefix(rx: str) -> str:
    return "^model\\.(?:" + rx.removeprefix("^") + ")"


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(spec: ClassifierBackboneSpec, files: list[str], *, weights: str | Path | None,
              revision: str | None) -> tuple[Path, dict]:
    """The folder holding ``files``: a local ``weights`` folder, or a Hub snapshot at an explicit commit."""
    if weights is not None:
        if revision is not None:
            raise ValueError(f"{spec.name}: pass either weights= (a local folder) or revision=, not both")
        folder = Path(weights)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{spec.name}: weights folder {folder} lacks {missing}")
        return folder, {"origin": f"override:{folder}", "resolved_revision": None,
                        "files": {f: _sha256(folder / f) for f in files if f.endswith(".safetensors")}}
    rev = revision or spec.revision
    if rev is None or not COMMIT_SHA.fullmatch(rev):
        raise ValueError(f"{spec.name}: no commit of {spec.hub_id} is pinned; pass revision='<40-hex commit sha>' "
                         f"(jobs: --revision), got {rev!r}")
    from huggingface_hub import hf_hub_download

    paths = [Path(hf_hub_download(spec.hub_id, f, revision=rev)) for f in files]
    folder = paths[0].parent
    if any(p.parent != folder for p in paths):
        raise RuntimeError(f"{spec.name}: files of {spec.hub_id}@{rev} landed in different folders")
    if folder.name != rev:
        raise RuntimeError(f"{spec.name}: asked for {spec.hub_id}@{rev} but the cache served {folder.name}")
    return folder, {"origin": "hub", "resolved_revision": rev,
                    "files": {f: _sha256(folder / f) for f in files if f.endswith(".safetensors")}}


# ------------------------------------------------------------------------------------------------ SigLIP
def _siglip_from_folder(spec: ClassifierBackboneSpec, folder: Path, source: dict) -> FeatureBackbone:
    from transformers import SiglipImageProcessor, SiglipVisionModel

    model, info = SiglipVisionModel.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True,
                                                    local_files_only=True)
    # A full SigLIP checkpoint (text + vision) loads its vision tower; text-tower keys are the only ones allowed
    # to be left over, and nothing may be missing or mis-shaped.
    unexpected = [k for k in info.get("unexpected_keys", []) if not str(k).startswith(("text_model.", "logit_"))]
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v and k != "unexpected_keys"}
    if unexpected:
        problems["unexpected_keys"] = sorted(map(str, unexpected))
    if problems:
        raise RuntimeError(f"{spec.name}: {folder} does not load cleanly into SiglipVisionModel: {problems}")
    proc = SiglipImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return _siglip_wrap(model, proc, source)


def _siglip_wrap(model: nn.Module, proc: Any, source: dict) -> FeatureBackbone:
    cfg = model.config
    size = proc.size
    side = int(size["height"]) if "height" in size else int(size["shortest_edge"])
    if side != cfg.image_size:
        raise ValueError(f"processor size {side} differs from the vision config image_size {cfg.image_size}")
    data_config = {"input_size": [3, side, side], "mean": [float(x) for x in proc.image_mean],
                   "std": [float(x) for x in proc.image_std], "interpolation": "bilinear",
                   "source": "SiglipImageProcessor (preprocessor_config.json)"}
    arch = {"kind": "siglip", "vision_config": cfg.to_dict()}
    return FeatureBackbone(model, kind="siglip", num_features=cfg.hidden_size, data_config=data_config,
                           arch_config=arch, source=source)


def _siglip_mini(spec: ClassifierBackboneSpec) -> FeatureBackbone:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**spec.mini)
    model = _seeded(lambda: SiglipVisionModel(cfg))
    proc = SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})  # the library's defaults
    return _siglip_wrap(model, proc, {"origin": "embedded", "resolved_revision": None, "files": {},
                                      "seed": MINI_SEED})


# ------------------------------------------------------------------------------------------------ timm
def _timm_wrap(model: nn.Module, arch: dict, source: dict) -> FeatureBackbone:
    import timm.data

    dc = timm.data.resolve_model_data_config(model)
    data_config = {"input_size": list(dc["input_size"]), "mean": [float(x) for x in dc["mean"]],
                   "std": [float(x) for x in dc["std"]], "interpolation": str(dc.get("interpolation", "bicubic")),
                   "source": "timm.data.resolve_model_data_config (pretrained_cfg)"}
    return FeatureBackbone(model, kind="timm", num_features=model.num_features, data_config=data_config,
                           arch_config=arch, source=source)


def _timm_from_folder(spec: ClassifierBackboneSpec, folder: Path, source: dict) -> FeatureBackbone:
    import timm

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("architecture") != spec.arch:
        raise ValueError(f"{spec.name}: {folder}/config.json has architecture {cfg.get('architecture')!r}, "
                         f"expected {spec.arch!r}")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    arch = {"kind": "timm", "architecture": spec.arch, "model_args": dict(cfg.get("model_args", {})),
            "pretrained_cfg": {k: cfg.get("pretrained_cfg", {}).get(k) for k in ("mean", "std", "input_size",
                                                                                 "interpolation", "crop_pct")}}
    return _timm_wrap(model, arch, source)


def _timm_mini(spec: ClassifierBackboneSpec) -> FeatureBackbone:
    import timm

    args = dict(spec.mini)
    size = args.pop("img_size")
    model = _seeded(lambda: timm.create_model(spec.arch, pretrained=False, num_classes=0, **args))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
    arch = {"kind": "timm", "architecture": spec.arch, "model_args": args,
            "pretrained_cfg": {"mean": list(model.pretrained_cfg["mean"]), "std": list(model.pretrained_cfg["std"]),
                               "input_size": [3, size, size],
                               "interpolation": model.pretrained_cfg.get("interpolation")}}
    return _timm_wrap(model, arch, {"origin": "embedded", "resolved_revision": None, "files": {}, "seed": MINI_SEED})


def _seeded(make: Callable[[], nn.Module]) -> nn.Module:
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(MINI_SEED)
        return make()
    finally:
        torch.random.set_rng_state(state)


# ------------------------------------------------------------------------------------------------ entry points
_FILES = {"transformers": ["config.json", "model.safetensors", "preprocessor_config.json"],
          "timm": ["config.json", "model.safetensors"]}


def build_feature_backbone(name: str, *, weights: str | Path | None = None,
                           revision: str | None = None) -> FeatureBackbone:
    """Build the registered backbone ``name``: embedded mini entries from the fixed seed; Hub entries from a local
    ``weights`` folder (the snapshot's files) or the Hub at ``revision``.

    Raises:
        KeyError: unknown name (listing the choices); ValueError: a Hub entry without a commit sha.
    """
    spec = get_classifier_spec(name)
    if spec.mini:
        if weights is not None or revision is not None:
            raise ValueError(f"{name}: an embedded (seeded) backbone takes neither weights nor a revision")
        return _siglip_mini(spec) if spec.library == "transformers" else _timm_mini(spec)
    folder, source = _snapshot(spec, _FILES[spec.library], weights=weights, revision=revision)
    if spec.library == "transformers":
        return _siglip_from_folder(spec, folder, source)
    return _timm_from_folder(spec, folder, source)


def rebuild_feature_backbone(arch: dict, data_config: dict) -> FeatureBackbone:
    """The architecture of a saved classifier (``config.json``'s ``backbone.arch``), randomly initialised; the
    caller loads the trained weights strictly. Needs no Hub access."""
    if arch.get("kind") == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        model = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in arch["vision_config"].items()
                                                        if k not in ("transformers_version", "model_type")}))
        return FeatureBackbone(model, kind="siglip", num_features=model.config.hidden_size, data_config=data_config,
                               arch_config=arch, source={"origin": "rebuilt"})
    if arch.get("kind") == "timm":
        import timm

        model = timm.create_model(arch["architecture"], pretrained=False, num_classes=0, **arch["model_args"])
        return FeatureBackbone(model, kind="timm", num_features=model.num_features, data_config=data_config,
                               arch_config=arch, source={"origin": "rebuilt"})
    raise ValueError(f"unknown backbone arch kind {arch.get('kind')!r} in config.json (expected siglip or timm)")


_register(ClassifierBackboneSpec(
    name="medsiglip-448", library="transformers", arch="siglip-vision", hub_id="google/medsiglip-448",
    notes="MedSigLIP-448 (Google HAI-DEF; SigLIP-400M vision tower, 448 px, patch 14, MAP head, width 1152); gated "
          "on the Hub (accept the HAI-DEF terms). No commit sha could be established offline: runs pass --revision."))
_register(ClassifierBackboneSpec(
    name="resnet50", library="timm", arch="resnet50", hub_id="timm/resnet50.a1_in1k",
    notes="ResNet-50 (timm a1_in1k recipe, Wightman et al. 2021), the baseline; runs pass --revision."))
_register(ClassifierBackboneSpec(
    name="convnextv2-tiny", library="timm", arch="convnextv2_tiny", hub_id="timm/convnextv2_tiny.fcmae_ft_in22k_in1k",
    notes="ConvNeXt-V2 Tiny (Woo et al. 2023), FCMAE + IN-22k/1k fine-tune; runs pass --revision."))
_register(ClassifierBackboneSpec(
    name="siglip-mini", library="transformers", arch="siglip-vision", hub_id=None,
    mini={"image_size": 32, "patch_size": 4, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4},
    notes="Embedded default: the SigLIP vision tower (MAP head) shrunk to 2 blocks of width 64, 32 px, seeded."))
_register(ClassifierBackboneSpec(
    name="resnet50-mini", library="timm", arch="resnet50", hub_id=None,
    mini={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16, "img_size": 32},
    notes="Embedded baseline: timm resnet50 (bottleneck blocks) with one block per stage, widths 16-128 (x4), "
          "32 px, seeded."))
_register(ClassifierBackboneSpec(
    name="convnextv2-mini", library="timm", arch="convnextv2_tiny", hub_id=None,
    mini={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128], "img_size": 32},
    notes="Embedded ConvNeXt-V2 with one block per stage and widths 16-128, 32 px, seeded."))
