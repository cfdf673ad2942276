"""Real backbones from the Hugging Face Hub, registered on import.

Every file is fetched with the Hub client (``huggingface_hub.hf_hub_download(repo_id, filename, revision=...)``), so
the cache, offline mode and endpoint settings of the client apply; the commit actually served is read from the
snapshot path and recorded with the model (``resolved_revision``). Weights are loaded strictly: any missing,
unexpected or mis-shaped key fails the build, naming the keys.

Entries (revision sources are in the notes of each entry and in the module constants below):

* ``meddinov3-vitb16-ct`` - MedDINOv3 ViT-B/16 pretrained on CT-3M, timm ``vit_base_patch16_dinov3`` (see
  :mod:`covtoken.backbone.meddinov3` for the architecture choice and the key mapping).
* ``dinov2-base`` / ``dinov2-base-reg`` - transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``.
* ``dermlip-vitb16``, ``biomedclip``, ``clip-vitb16-openai`` - the image tower of open_clip models: open_clip's
  public ``open_clip.CLIP`` is built from the ``vision_cfg`` of the pinned snapshot's ``open_clip_config.json`` with a
  one-layer placeholder text tower, and its ``visual`` tower receives the ``visual.*`` weights strictly.
  ``open_clip.create_model`` cannot take a revision, and for BiomedCLIP it would also fetch the config of its
  PubMedBERT text tower from another, unpinned repository.

Preprocessing is each library's own transform (:mod:`covtoken.backbone.preprocess`), resolved from the same
snapshot (transformers: its ``preprocessor_config.json``; open_clip: the ``preprocess_cfg`` of its config; timm:
the model's pretrained config) and attached to the model.

Heavy libraries (transformers, open_clip, the Hub client) are imported inside the builders.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .frozen import attach_source
from .preprocess import attach_preprocess, open_clip_transform, timm_transform, transformers_transform
from .meddinov3 import CHECKPOINT_FILENAME, CheckpointMismatchError, create_meddinov3_vit, load_meddinov3_checkpoint
from .registry import COMMIT_SHA, BackboneSpec, register, weights_dir

__all__ = ["RevisionRequiredError", "WeightsIntegrityError", "CheckpointMismatchError", "build_meddinov3",
           "build_dinov2", "build_open_clip_vision", "MEDDINOV3_HU_WINDOW"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: MedDINOv3's inference/demo.ipynb normalize(): HU clamped to [-1000, 1000], then (HU - 65.1084213256836) /
#: 178.01663208007812, repeated to 3 channels. With CT windowed linearly to [0, 1] over this HU range
#: (u = (HU + 1000) / 2000), that is (u - 1065.108.../2000) / (178.016.../2000), the mean/std below.
MEDDINOV3_HU_WINDOW = (-1000.0, 1000.0)
_HU_SPAN = MEDDINOV3_HU_WINDOW[1] - MEDDINOV3_HU_WINDOW[0]
MEDDINOV3_MEAN = ((65.1084213256836 - MEDDINOV3_HU_WINDOW[0]) / _HU_SPAN,) * 3
MEDDINOV3_STD = (178.01663208007812 / _HU_SPAN,) * 3
#: timm pretrained-config entries of MedDINOv3 (its demo normalisation; timm's DINOv3 resize otherwise).
MEDDINOV3_DATA_CONFIG = {"mean": MEDDINOV3_MEAN, "std": MEDDINOV3_STD}
_PROCESSOR_CONFIG = "preprocessor_config.json"

_OPEN_CLIP_CONFIG = "open_clip_config.json"
#: Weight file of each open_clip repository, in order of preference (the first one found is used).
_OPEN_CLIP_WEIGHTS: dict[str, tuple[str, ...]] = {
    "timm/vit_base_patch16_clip_224.openai": ("open_clip_model.safetensors",),
    "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": ("open_clip_pytorch_model.bin",),
}
_OPEN_CLIP_DEFAULT_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Text tower of the CLIP the image tower is taken from: the smallest open_clip text transformer (discarded).
_PLACEHOLDER_TEXT_CFG = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


class RevisionRequiredError(ValueError):
    """An unpinned Hub entry was loaded without an explicit revision, or a revision is not a commit sha."""


class WeightsIntegrityError(RuntimeError):
    """A downloaded weight file does not match the sha256 recorded in the registry."""


@dataclass(frozen=True)
class _Fetched:
    files: dict[str, Path]          # file name -> local path
    origin: str                     # "hub" or "override:<path>"
    resolved_revision: str | None   # commit served by the Hub; None for local overrides


def _repo_id(spec: BackboneSpec) -> str:
    assert spec.hub_id is not None
    return spec.hub_id.removeprefix("hf-hub:")


def _revision_to_fetch(spec: BackboneSpec, revision: str | None) -> str:
    """The commit to fetch: an explicit ``revision`` (a 40-hex sha) or the pinned one."""
    if revision is not None:
        if not COMMIT_SHA.fullmatch(revision):
            raise RevisionRequiredError(f"{spec.name}: revision must be a full 40-hex commit sha, got {revision!r}")
        if spec.revision is not None and revision != spec.revision:
            log.warning("%s: loading revision %s instead of the pinned %s", spec.name, revision, spec.revision)
        return revision
    if spec.revision is None:
        raise RevisionRequiredError(
            f"{spec.name}: no commit of {spec.hub_id} is pinned in the registry (revision_pinned=False); pass "
            f"revision='<40-hex commit sha>' (jobs: --revision), e.g. the head of "
            f"https://huggingface.co/{_repo_id(spec)}/commits/main")
    return spec.revision


def _commit_of(path: Path) -> str:
    """The commit sha in a Hub cache path ``.../snapshots/<sha>/<file>``."""
    parts = path.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and COMMIT_SHA.fullmatch(parts[i + 1]):
            return parts[i + 1]
    raise RuntimeError(f"{path} is not inside a Hub cache snapshot folder; cannot tell which commit was served")


def _fetch(spec: BackboneSpec, groups: Sequence[Sequence[str]], *, revision: str | None,
           weights: str | Path | None) -> _Fetched:
    """One file from each group of alternatives (first found wins), from the Hub or from a local override.

    Args:
        spec: registry entry (its ``hub_id`` names the repository).
        groups: e.g. ``[("config.json",), ("model.safetensors",)]``.
        revision: explicit commit sha, or None for the pinned one.
        weights: a local folder holding the files (or, with a single group, the file itself).
    """
    local = weights_dir(weights)
    if local is not None:
        if revision is not None:
            raise ValueError(f"{spec.name}: pass either weights= (local files) or revision=, not both")
        files = {}
        for group in groups:
            if local.is_file() and len(groups) == 1:
                files[group[0]] = local
                continue
            found = [local / name for name in group if (local / name).is_file()]
            if not found:
                raise FileNotFoundError(f"{spec.name}: none of {list(group)} in weights folder {local}")
            files[found[0].name] = found[0]
        return _Fetched(files=files, origin=f"override:{local}", resolved_revision=None)

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    rev = _revision_to_fetch(spec, revision)
    repo_id = _repo_id(spec)
    files: dict[str, Path] = {}
    for group in groups:
        errors = []
        for name in group:
            try:
                files[name] = Path(hf_hub_download(repo_id, name, revision=rev))
                break
            except (EntryNotFoundError, LocalEntryNotFoundError) as err:
                errors.append(f"{name}: {type(err).__name__}: {err}")
        else:
            raise FileNotFoundError(f"{spec.name}: none of {list(group)} could be fetched from {repo_id}@{rev}: "
                                    + " | ".join(errors))
    commits = {_commit_of(p) for p in files.values()}
    if len(commits) != 1:
        raise RuntimeError(f"{spec.name}: files of {repo_id} came from different commits {sorted(commits)}")
    resolved = commits.pop()
    if resolved != rev:
        raise RuntimeError(f"{spec.name}: asked for {repo_id}@{rev} but the cache served commit {resolved}")
    return _Fetched(files=files, origin="hub", resolved_revision=resolved)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_digests(spec: BackboneSpec, fetched: _Fetched, weight_file: str) -> dict[str, str]:
    """sha256 of the weight file, checked against ``spec.weights_sha256`` when the pinned commit was fetched."""
    digest = _sha256(fetched.files[weight_file])
    pinned = fetched.origin == "hub" and fetched.resolved_revision == spec.revision
    if spec.weights_sha256 and pinned and not digest.startswith(spec.weights_sha256.lower()):
        raise WeightsIntegrityError(f"{spec.name}: {weight_file} at {spec.revision} has sha256 {digest}, "
                                    f"the registry expects {spec.weights_sha256}")
    return {weight_file: "sha256:" + digest}


def _check_geometry(spec: BackboneSpec, found: dict[str, object]) -> None:
    expected = {"depth": spec.depth, "width": spec.width, "patch_size": spec.patch_size,
                "num_prefix_tokens": spec.num_prefix_tokens}
    wrong = {k: (v, expected[k]) for k, v in found.items() if k in expected and v != expected[k]}
    if wrong:
        raise ValueError(f"{spec.name}: the built model disagrees with the registry (model, registry): {wrong}")


def build_meddinov3(*, spec: BackboneSpec, weights: str | Path | None = None,
                    revision: str | None = None) -> torch.nn.Module:
    """MedDINOv3 ViT-B/16 as a timm DINOv3 ViT with the ``teacher`` backbone weights of ``model.pth``.

    Args:
        spec: registry entry (geometry, repository, pinned revision).
        weights: local ``model.pth`` (or a folder holding it) instead of the Hub.
        revision: 40-hex commit sha replacing the pinned one.
    """
    fetched = _fetch(spec, [(CHECKPOINT_FILENAME,)], revision=revision, weights=weights)
    path = fetched.files[CHECKPOINT_FILENAME]
    digests = _file_digests(spec, fetched, CHECKPOINT_FILENAME)
    model = create_meddinov3_vit(image_size=spec.image_size, patch_size=spec.patch_size, depth=spec.depth,
                                 width=spec.width, data_config=MEDDINOV3_DATA_CONFIG)
    _check_geometry(spec, {"num_prefix_tokens": model.num_prefix_tokens})
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    load_meddinov3_checkpoint(model, checkpoint, source=str(path))
    attach_preprocess(model, timm_transform(model, name=spec.name, image_size=spec.image_size, mean=spec.mean,
                                            std=spec.std))
    return attach_source(model, origin=fetched.origin, resolved_revision=fetched.resolved_revision, files=digests)


_TRANSFORMERS_TYPES = {0: ("dinov2", "Dinov2Model"), 4: ("dinov2_with_registers", "Dinov2WithRegistersModel")}


def build_dinov2(*, spec: BackboneSpec, weights: str | Path | None = None,
                 revision: str | None = None) -> torch.nn.Module:
    """DINOv2 (``num_registers == 0``) or DINOv2 with registers (``num_registers == 4``) from transformers.

    ``config.json`` and ``model.safetensors`` of the commit are fetched with the Hub client and loaded with
    ``from_pretrained`` on that snapshot folder; any missing, unexpected or mis-shaped key is an error.
    """
    import transformers

    if spec.num_registers not in _TRANSFORMERS_TYPES:
        raise ValueError(f"{spec.name}: no transformers DINOv2 class with {spec.num_registers} registers")
    model_type, class_name = _TRANSFORMERS_TYPES[spec.num_registers]
    fetched = _fetch(spec, [("config.json",), ("model.safetensors",), (_PROCESSOR_CONFIG,)], revision=revision,
                     weights=weights)
    digests = _file_digests(spec, fetched, "model.safetensors")
    folder = fetched.files["model.safetensors"].parent
    if {p.parent for p in fetched.files.values()} != {folder}:
        raise RuntimeError(f"{spec.name}: config.json, model.safetensors and {_PROCESSOR_CONFIG} are in different "
                           "folders")
    config = json.loads(fetched.files["config.json"].read_text(encoding="utf-8"))
    if config.get("model_type") != model_type:
        raise ValueError(f"{spec.name}: config.json has model_type {config.get('model_type')!r}, "
                         f"expected {model_type!r}")
    model, info = getattr(transformers, class_name).from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True, local_files_only=True)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise CheckpointMismatchError(f"{spec.name}: {folder} does not load cleanly into {class_name}: {problems}")
    cfg = model.config
    _check_geometry(spec, {"depth": cfg.num_hidden_layers, "width": cfg.hidden_size, "patch_size": cfg.patch_size,
                           "num_prefix_tokens": 1 + int(getattr(cfg, "num_register_tokens", 0))})
    attach_preprocess(model, transformers_transform(folder, name=spec.name, image_size=spec.image_size,
                                                    mean=spec.mean, std=spec.std))
    return attach_source(model, origin=fetched.origin, resolved_revision=fetched.resolved_revision, files=digests)


def build_open_clip_vision(*, spec: BackboneSpec, weights: str | Path | None = None,
                           revision: str | None = None) -> torch.nn.Module:
    """The image tower of an open_clip model: open_clip's ViT (``visual``) or its timm adapter (``visual.trunk``).

    The tower is built by open_clip's public ``open_clip.CLIP`` from the snapshot's ``open_clip_config.json`` (its
    ``vision_cfg`` and QuickGELU flag; the text tower is a one-layer placeholder that is dropped, so BiomedCLIP never
    fetches its PubMedBERT config; timm trunks never fetch their own pretrained weights) and receives the
    ``visual.*`` entries of the checkpoint with ``strict=True``. The config's ``preprocess_cfg`` gives the library
    transform; its mean, std and size must agree with the registry entry.
    """
    import open_clip
    from open_clip.factory import load_state_dict

    candidates = _OPEN_CLIP_WEIGHTS.get(_repo_id(spec), _OPEN_CLIP_DEFAULT_WEIGHTS)
    fetched = _fetch(spec, [(_OPEN_CLIP_CONFIG,), candidates], revision=revision, weights=weights)
    weight_file = next(name for name in fetched.files if name != _OPEN_CLIP_CONFIG)
    digests = _file_digests(spec, fetched, weight_file)
    config = json.loads(fetched.files[_OPEN_CLIP_CONFIG].read_text(encoding="utf-8"))
    if "model_cfg" not in config:
        raise ValueError(f"{spec.name}: {_OPEN_CLIP_CONFIG} has no 'model_cfg' (keys {sorted(config)})")
    model_cfg = config["model_cfg"]
    transform = open_clip_transform(config.get("preprocess_cfg", {}), name=spec.name, image_size=spec.image_size,
                                    mean=spec.mean, std=spec.std)

    vision_cfg = dict(model_cfg["vision_cfg"])
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # the checkpoint provides every weight
    visual = open_clip.CLIP(model_cfg["embed_dim"], vision_cfg, _PLACEHOLDER_TEXT_CFG,
                            quick_gelu=bool(model_cfg.get("quick_gelu", False))).visual
    state = load_state_dict(str(fetched.files[weight_file]), device="cpu", weights_only=True)
    visual_state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual_state:
        raise CheckpointMismatchError(f"{spec.name}: no 'visual.' keys in {weight_file} "
                                      f"(first keys {sorted(state)[:5]})")
    expected = visual.state_dict()
    missing, unexpected = sorted(set(expected) - set(visual_state)), sorted(set(visual_state) - set(expected))
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in sorted(visual_state.items())
              if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(f"{spec.name}: visual weights of {weight_file} do not match the tower built "
                                      f"from {_OPEN_CLIP_CONFIG}: missing {missing}; unexpected {unexpected}; "
                                      f"shape mismatches {shapes}")
    visual.load_state_dict(visual_state, strict=True)

    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        found = {"depth": len(trunk.blocks), "width": trunk.embed_dim, "patch_size": trunk.patch_embed.patch_size[0],
                 "num_prefix_tokens": trunk.num_prefix_tokens}
    elif isinstance(visual, open_clip.transformer.VisionTransformer):
        found = {"depth": len(visual.transformer.resblocks), "width": visual.transformer.width,
                 "patch_size": visual.patch_size[0], "num_prefix_tokens": 1}
    else:
        raise ValueError(f"{spec.name}: unsupported open_clip image tower {type(visual).__name__}")
    _check_geometry(spec, found)
    attach_preprocess(visual, transform)
    return attach_source(visual, origin=fetched.origin, resolved_revision=fetched.resolved_revision, files=digests)


def _vit_b(**kwargs: object) -> dict[str, object]:
    geometry = dict(image_size=224, patch_size=16, depth=12, width=768, num_prefix_tokens=1, num_registers=0)
    return dict(geometry, **kwargs)


MEDDINOV3 = register(BackboneSpec(
    name="meddinov3-vitb16-ct", licence="Apache-2.0", library="timm", hub_id="ricklisz123/MedDINOv3-ViTB-16-CT-3M",
    # A commit of the repository seen on a Hub mirror (blame view of README.md at 20d233b, whose content equals the
    # current main README); that model.pth is present at this commit could not be checked offline.
    revision="20d233b0ce1b1f93c46550787cf4b409a6f4a95e",
    **_vit_b(image_size=512, num_prefix_tokens=5, num_registers=4),
    mean=MEDDINOV3_MEAN, std=MEDDINOV3_STD, builder=build_meddinov3, modality="CT",
    notes="MedDINOv3 (Li et al., arXiv:2509.02379), Apache-2.0. timm vit_base_patch16_dinov3 (qkv_bias=False, "
          "layer scale, RoPE base 100, 1 CLS + 4 registers, LayerNorm eps 1e-6 as in the official README); "
          "weights: model.pth['teacher'], prefix 'backbone.'. Input: CT windowed linearly to [0, 1] over HU "
          "[-1000, 1000] (grey repeated to 3 channels); mean/std reproduce the official demo normalisation "
          "(HU - 65.108) / 178.017. 512 px = native CT slice size (32x32 grid). RoPE is computed in fp32 by timm "
          "(periods copied from the checkpoint); the research code computes it in bf16.",
))

DINOV2_BASE = register(BackboneSpec(
    name="dinov2-base", licence="Apache-2.0", library="transformers", hub_id="facebook/dinov2-base",
    revision="f9e44c814b77203eaa57a6bdbbd535f21ede1415",  # pinned by mteb's ModelMeta for facebook/dinov2-base
    **_vit_b(patch_size=14), mean=IMAGENET_MEAN, std=IMAGENET_STD, builder=build_dinov2,
    notes="DINOv2 ViT-B/14 (Oquab et al. 2023), Apache-2.0; 224 px -> 16x16 grid (position embeddings "
          "interpolated from 37x37 by transformers); 1 CLS token, no registers.",
))

DINOV2_BASE_REG = register(BackboneSpec(
    name="dinov2-base-reg", licence="Apache-2.0", library="transformers", hub_id="facebook/dinov2-with-registers-base",
    revision="a1d738ccfa7ae170945f210395d99dde8adb1805",
    weights_sha256="7a6f7b3b9fa4b8732e707476a03cd6cdce210048582f21aafb7991c17d98e362",  # model.safetensors
    **_vit_b(patch_size=14, num_prefix_tokens=5, num_registers=4), mean=IMAGENET_MEAN, std=IMAGENET_STD,
    builder=build_dinov2,
    notes="DINOv2 ViT-B/14 with 4 registers (Darcet et al., ICLR 2024), Apache-2.0; 224 px -> 16x16 grid; "
          "1 CLS + 4 registers stripped.",
))

DERMLIP = register(BackboneSpec(
    name="dermlip-vitb16", licence="see model card (sibling DermLIP: CC-BY-NC-ND-4.0)", library="open_clip", hub_id="hf-hub:redlessone/DermLIP_ViT-B-16",
    revision=None, revision_pinned=False,  # no commit sha of this repository could be found offline
    **_vit_b(), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, builder=build_open_clip_vision, modality="dermoscopy",
    notes="DermLIP ViT-B/16 (Derm1M, Yan et al., arXiv:2503.14911); check the licence on the model card "
          "(the sibling DermLIP model is CC-BY-NC-ND-4.0). Loading needs an explicit revision. Mean/std are "
          "checked against the snapshot's open_clip_config.json at load time.",
))

BIOMEDCLIP = register(BackboneSpec(
    name="biomedclip", licence="MIT", library="open_clip", hub_id="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    revision="9f341de24bfb00180f1b847274256e9b65a3a32e",
    **_vit_b(), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, builder=build_open_clip_vision,
    notes="BiomedCLIP (Zhang et al., NEJM AI 2024), MIT; image tower = timm vit_base_patch16_224 trunk "
          "(visual.trunk), tokens taken from the trunk; weights open_clip_pytorch_model.bin.",
))

CLIP_OPENAI = register(BackboneSpec(
    name="clip-vitb16-openai", licence="MIT", library="open_clip", hub_id="hf-hub:timm/vit_base_patch16_clip_224.openai",
    revision="977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d",
    weights_sha256="4b8699299b1e8997753c64b052ba32031449d5d853f55a039148560ee02b820f",  # open_clip_model.safetensors
    **_vit_b(), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, builder=build_open_clip_vision,
    notes="OpenAI CLIP ViT-B/16 (Radford et al. 2021, MIT) via the timm Hub copy in open_clip format; QuickGELU.",
))
