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

Hub snapshots are fetched with the Hub client at the pinned commit or an explicit 40-hex ``revision=`` (entries
registered with ``revision_pinned=False``, whose commit could not be established offline, need one: a job's
``--revision`` / ``--baseline-revision``), or read from a local folder (``weights=``), through the same code. The
``*-mini`` entries are the embedded default: the same architectures, shrunk, from a fixed seed, needing no download.

The rule of the frozen-backbone registry applies unchanged (:class:`covtoken.backbone.registry.BackboneSpec`): an
entry pins a revision or says ``revision_pinned=False``; ``weights_sha256`` records the digest of its weight file
where it is known. Whether a run's weights are a pinned, digest-verified pretrained checkpoint is decided by the one
function :func:`covtoken.backbone.registry.pinned_digest_verified`, through :func:`covtoken.evidence.weights_verified`
on the facts :meth:`FeatureBackbone.weights_facts` records (``registry: "classifier"``); an entry without a digest is
never verified, so its runs are flow checks.
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
    revision_pinned: bool = True
    weights_sha256: str | None = None  # hex sha256 of model.safetensors at ``revision`` (None: unknown)

    def __post_init__(self) -> None:
        if self.library not in ("timm", "transformers"):
            raise ValueError(f"{self.name}: library must be timm or transformers, got {self.library!r}")
        if self.revision is not None and not COMMIT_SHA.fullmatch(self.revision):
            raise ValueError(f"{self.name}: revision must be a 40-hex commit sha, got {self.revision!r}")
        if (self.hub_id is None) == (not self.mini):
            raise ValueError(f"{self.name}: an entry has either a Hub id or a mini architecture")
        # the frozen-backbone registry's rule (BackboneSpec): a Hub entry pins a commit or says it cannot
        if not self.revision_pinned and (self.hub_id is None or self.revision is not None):
            raise ValueError(f"{self.name}: revision_pinned=False is only for Hub entries registered without a revision")
        if self.hub_id is not None and self.revision is None and self.revision_pinned:
            raise ValueError(f"{self.name}: Hub weights {self.hub_id!r} need a pinned revision "
                             "(or revision_pinned=False, so that loading requires an explicit revision)")
        if self.weights_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256):
            raise ValueError(f"{self.name}: weights_sha256 must be 64 lower-case hex digits")


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
                 source: dict, spec: ClassifierBackboneSpec | None = None) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.num_features = int(num_features)
        self.data_config = data_config
        self.arch_config = arch_config
        self.source = source
        self.spec = spec  # the registry entry it was built from (None for a model rebuilt from a config.json)

    def weights_facts(self) -> dict:
        """The facts the evidence tier rests on, as a record's backbone block stores them: which registry entry,
        where the starting weights came from, the commit served and the digests of the weight files read."""
        spec = self.spec
        return {"registry": "classifier", "name": spec.name if spec else None, "hub_id": spec.hub_id if spec else None,
                "weights_origin": self.source.get("origin"), "resolved_revision": self.source.get("resolved_revision"),
                "weights_files": dict(self.source.get("files", {}))}

    @property
    def weights_verification(self) -> tuple[bool, str]:
        """``(verified, reason)`` from :func:`covtoken.evidence.weights_verified` - the same function the audit
        runs on the record."""
        from ..evidence import weights_verified

        return weights_verified(self.weights_facts())

    @property
    def weights_verified(self) -> bool:
        return self.weights_verification[0]

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


def resolve_revision(spec: ClassifierBackboneSpec, revision: str | None) -> str:
    """The commit to fetch: an explicit ``revision`` (40-hex) or the pinned one; raises ``ValueError`` (one line,
    naming the flag) for an entry registered with ``revision_pinned=False`` and no revision, or a malformed sha."""
    if revision is not None:
        if not COMMIT_SHA.fullmatch(revision):
            raise ValueError(f"{spec.name}: revision must be a full 40-hex commit sha, got {revision!r}")
        return revision
    if spec.revision is None:
        raise ValueError(f"{spec.name}: no commit of {spec.hub_id} is pinned in the registry (revision_pinned=False); "
                         f"pass revision='<40-hex commit sha>' (jobs: --revision / --baseline-revision), e.g. the head "
                         f"of https://huggingface.co/{spec.hub_id}/commits/main")
    return spec.revision


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
    rev = resolve_revision(spec, revision)
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
        bb = _siglip_mini(spec) if spec.library == "transformers" else _timm_mini(spec)
    else:
        folder, source = _snapshot(spec, _FILES[spec.library], weights=weights, revision=revision)
        bb = _siglip_from_folder(spec, folder, source) if spec.library == "transformers" else \
            _timm_from_folder(spec, folder, source)
    bb.spec = spec
    return bb


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
    # A commit of google/medsiglip-448 seen in public code: a packaging script copies config.json, model.safetensors
    # and preprocessor_config.json out of the Hub cache folder models--google--medsiglip-448/snapshots/9cea28a1...
    # (a snapshot folder is named by the commit served). Not checked against the Hub here (unreachable). No digest of
    # its model.safetensors was found, so runs of this entry are flow checks until one is recorded.
    revision="9cea28a1a1195f665105faa6e8544c112fd960a4",
    notes="MedSigLIP-448 (Google HAI-DEF; SigLIP-400M vision tower, 448 px, patch 14, MAP head, width 1152); gated "
          "on the Hub (accept the HAI-DEF terms). Pinned commit from a public Hub-cache path; no weight digest "
          "recorded, so its runs cannot be real evidence yet."))
_register(ClassifierBackboneSpec(
    name="resnet50", library="timm", arch="resnet50", hub_id="timm/resnet50.a1_in1k",
    # A commit of timm/resnet50.a1_in1k seen in public code: a feature-extraction script loads
    # models--timm--resnet50.a1_in1k/snapshots/767268603ca0cb0bfe326fa87277f19c419566ef/model.safetensors.
    revision="767268603ca0cb0bfe326fa87277f19c419566ef",
    # sha256 of https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors as published in the
    # pretrained-model registry of the ferrotorch project (ferrotorch-hub; "downloaded, hashed locally, and pinned"),
    # hashed at main, not at the commit above: not checked here. Other bytes at the pinned commit leave the run a
    # flow check (evidence names the mismatch); nothing else depends on it.
    weights_sha256="773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb",
    notes="ResNet-50 (timm a1_in1k recipe, Wightman et al. 2021), the baseline."))
_register(ClassifierBackboneSpec(
    name="convnextv2-tiny", library="timm", arch="convnextv2_tiny", hub_id="timm/convnextv2_tiny.fcmae_ft_in22k_in1k",
    revision=None, revision_pinned=False,  # no commit sha of this repository could be found offline
    notes="ConvNeXt-V2 Tiny (Woo et al. 2023), FCMAE + IN-22k/1k fine-tune; loading needs an explicit revision "
          "(--revision)."))
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
