"""Offline tests of the Hub backbones (backbone/hub.py, backbone/meddinov3.py, backbone/extract.py).

Each real loader runs unchanged on a small, randomly initialised model of the same architecture, written in the
layout of its Hub repository into a Hugging Face cache under tmp_path (``snapshots/<sha>/...`` plus ``refs/main``)
with the Hub client in offline mode. Tokens are compared with the library's own forward (hooks on the blocks, the
model's final norm, its full forward), not with the extractor's own code path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from covtoken.backbone import registry
from covtoken.backbone.frozen import FrozenBackbone, load_backbone
from covtoken.backbone.hub import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RevisionRequiredError, WeightsIntegrityError,
                                   build_meddinov3)
from covtoken.backbone.meddinov3 import CheckpointMismatchError, create_meddinov3_vit, load_meddinov3_checkpoint
from covtoken.backbone.registry import COMMIT_SHA, UnknownBackboneError, get_spec, list_backbones

SHA = hashlib.sha1(b"covtoken test snapshot").hexdigest()  # stands for the commit a test snapshot was taken at
HUB_NAMES = ["meddinov3-vitb16-ct", "dinov2-base", "dinov2-base-reg", "dermlip-vitb16", "biomedclip",
             "clip-vitb16-openai"]
ATOL = 1e-5


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, with the Hub client offline and pointed at it (read at call time)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def snapshot_dir(cache: Path, hub_id: str, sha: str = SHA) -> Path:
    """``<cache>/models--org--name/snapshots/<sha>/`` with ``refs/main`` pointing at it."""
    repo = cache / ("models--" + hub_id.removeprefix("hf-hub:").replace("/", "--"))
    folder = repo / "snapshots" / sha
    folder.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return folder


def variant(name: str, **changes: object) -> registry.BackboneSpec:
    """The registry entry ``name`` with a test name, no file hash and the given geometry changes."""
    spec = get_spec(name)
    changes.setdefault("revision", SHA if spec.revision_pinned else None)
    return dataclasses.replace(spec, name=f"test-{name}", weights_sha256=None, **changes)


#: preprocessor_config.json of facebook/dinov2-base (BitImageProcessor: shortest edge 256, centre crop 224, bicubic).
DINOV2_PROCESSOR = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                    "do_normalize": True, "do_rescale": True, "do_resize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
                    "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 0.00392156862745098,
                    "size": {"shortest_edge": 256}}


def save_dinov2_snapshot(model: torch.nn.Module, folder: Path) -> Path:
    """``model`` and the DINOv2 image-processor config in ``folder`` (the files of a Hub snapshot)."""
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    return folder


def block_outputs(blocks: torch.nn.ModuleList, run: Callable[[], object], wanted: list[int]) -> dict[int, torch.Tensor]:
    """Outputs of ``blocks[b]`` during ``run()``, read with forward hooks (the reference for the extractors)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [blocks[b].register_forward_hook(
        lambda mod, args, out, b=b: seen.__setitem__(b, out[0] if isinstance(out, tuple) else out)) for b in wanted]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial value, so that a swapped or skipped weight changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def grey_images(n: int, size: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((size + 7, size - 5), dtype=np.float32) for _ in range(n)]


# --------------------------------------------------------------------------- registry


def test_registry_entries_are_consistent() -> None:
    names = list_backbones()
    for name in HUB_NAMES:
        assert name in names
        spec = get_spec(name)
        assert spec.num_prefix_tokens == 1 + spec.num_registers
        if spec.revision_pinned:
            assert COMMIT_SHA.fullmatch(spec.revision), name
        else:
            assert spec.revision is None
        if spec.library == "open_clip":
            assert spec.hub_id.startswith("hf-hub:")
    assert get_spec("dinov2-base").grid == (16, 16) and get_spec("dinov2-base-reg").grid == (16, 16)
    assert get_spec("meddinov3-vitb16-ct").num_registers == 4
    assert not get_spec("dermlip-vitb16").revision_pinned


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(UnknownBackboneError) as err:
        get_spec("dinov2-huge")
    for name in HUB_NAMES:
        assert name in str(err.value)


def test_spec_rejects_short_or_missing_revisions() -> None:
    spec = get_spec("dinov2-base")
    with pytest.raises(ValueError, match="40-hex"):
        dataclasses.replace(spec, revision="main")
    with pytest.raises(ValueError, match="pinned revision"):
        dataclasses.replace(spec, revision=None)
    with pytest.raises(ValueError, match="revision_pinned=False"):
        dataclasses.replace(spec, revision_pinned=False)


def test_unpinned_entry_needs_an_explicit_commit(hub_cache: Path) -> None:
    with pytest.raises(RevisionRequiredError, match="--revision"):
        load_backbone("dermlip-vitb16")
    with pytest.raises(RevisionRequiredError, match="40-hex"):
        load_backbone("dermlip-vitb16", revision="main")
    with pytest.raises(ValueError, match="no Hub weights"):
        load_backbone("tiny-vit", revision=SHA)


# --------------------------------------------------------------------------- MedDINOv3 (timm DINOv3)


def reference_dinov3(width: int = 64, depth: int = 2, image_size: int = 64) -> torch.nn.Module:
    """A timm DINOv3 ViT built directly (not through the code under test), with bf16-rounded RoPE periods."""
    import timm
    from timm.layers import LayerNorm

    model = timm.create_model("vit_base_patch16_dinov3", pretrained=False, num_classes=0, img_size=image_size,
                              depth=depth, embed_dim=width, num_heads=width // 64,
                              norm_layer=partial(LayerNorm, eps=1e-6))
    randomise(model)
    model.rope.periods.copy_(model.rope.periods.to(torch.bfloat16).float())
    return model


def meddinov3_checkpoint(model: torch.nn.Module) -> dict:
    """``model`` in the MedDINOv3 file layout (DINOv3 key names under teacher/backbone., plus heads)."""
    width = model.embed_dim
    teacher = {}
    for key, value in model.state_dict().items():
        key = "storage_tokens" if key == "reg_token" else re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
        teacher["backbone." + key] = value.clone()
    teacher["backbone.mask_token"] = torch.zeros(1, width)
    teacher["backbone.rope_embed.periods"] = model.rope.periods.to(torch.bfloat16)
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, width)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(8, width)
    return {"teacher": teacher}


def test_meddinov3_loads_strictly_and_matches_reference(hub_cache: Path) -> None:
    ref = reference_dinov3()
    path = snapshot_dir(hub_cache, "ricklisz123/MedDINOv3-ViTB-16-CT-3M") / "model.pth"
    torch.save(meddinov3_checkpoint(ref), path)
    spec = variant("meddinov3-vitb16-ct", depth=2, width=64, image_size=64)

    backbone = FrozenBackbone(spec, spec.builder(spec=spec))
    assert torch.equal(backbone.model.rope.periods, ref.rope.periods)
    pixels = backbone.preprocess(grey_images(2, 64))  # grey (H, W) -> 3 channels, resized to 64
    assert pixels.shape == (2, 3, 64, 64) and torch.equal(pixels[:, 0], pixels[:, 2])

    raw = backbone.patch_tokens(pixels, [0, 1])
    normed = backbone.patch_tokens(pixels, [0, 1], final_norm=True)
    hooked = block_outputs(ref.blocks, lambda: ref.forward_features(pixels), [0, 1])
    with torch.no_grad():
        full = ref.forward_features(pixels)  # final norm applied to all 5 + 16 tokens
    for b in (0, 1):
        assert raw[b].shape == (2, 16, 64)
        torch.testing.assert_close(raw[b], hooked[b][:, 5:], atol=ATOL, rtol=0)
        torch.testing.assert_close(normed[b], ref.norm(hooked[b])[:, 5:].detach(), atol=ATOL, rtol=0)
        assert not torch.allclose(normed[b], raw[b], atol=1e-3)
    torch.testing.assert_close(normed[1], full[:, 5:], atol=ATOL, rtol=0)

    prov = backbone.provenance(blocks=[0, 1], final_norm=True)
    assert prov["resolved_revision"] == SHA and prov["revision_pinned"] and prov["weights_origin"] == "hub"
    assert prov["weights_files"] == {"model.pth": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}
    assert prov["num_prefix_tokens_stripped"] == 5


def test_meddinov3_weights_override_records_the_local_file(tmp_path: Path) -> None:
    ref = reference_dinov3()
    path = tmp_path / "model.pth"
    torch.save(meddinov3_checkpoint(ref), path)
    spec = variant("meddinov3-vitb16-ct", depth=2, width=64, image_size=64)
    model = build_meddinov3(spec=spec, weights=path)
    assert model.covtoken_source["origin"] == f"override:{path}"
    assert model.covtoken_source["resolved_revision"] is None
    torch.testing.assert_close(model.state_dict()["blocks.1.gamma_2"], ref.state_dict()["blocks.1.gamma_2"])


@pytest.mark.parametrize("edit, key", [
    ("drop", "backbone.blocks.1.mlp.fc2.bias"),
    ("add", "backbone.blocks.0.attn.qkv.bias"),  # a q/k/v bias would mean the _qkvb variant
    ("drop", "backbone.rope_embed.periods"),
])
def test_meddinov3_checkpoint_mismatch_names_the_key(edit: str, key: str) -> None:
    checkpoint = meddinov3_checkpoint(reference_dinov3())
    if edit == "drop":
        del checkpoint["teacher"][key]
    else:
        checkpoint["teacher"][key] = torch.zeros(3 * 64)
    model = create_meddinov3_vit(image_size=64, depth=2, width=64)
    with pytest.raises(CheckpointMismatchError) as err:
        load_meddinov3_checkpoint(model, checkpoint)
    assert key.removeprefix("backbone.") in str(err.value)
    assert ("missing" if edit == "drop" else "unexpected") in str(err.value)


def test_meddinov3_rejects_foreign_rope_schedule() -> None:
    checkpoint = meddinov3_checkpoint(reference_dinov3())
    checkpoint["teacher"]["backbone.rope_embed.periods"] = checkpoint["teacher"]["backbone.rope_embed.periods"] * 2
    with pytest.raises(CheckpointMismatchError, match="RoPE"):
        load_meddinov3_checkpoint(create_meddinov3_vit(image_size=64, depth=2, width=64), checkpoint)


# --------------------------------------------------------------------------- DINOv2 (transformers)


def reference_dinov2(with_registers: bool) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg_cls, model_cls = ((Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if with_registers
                          else (Dinov2Config, Dinov2Model))
    config = cfg_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     patch_size=14, image_size=518)
    torch.manual_seed(0)
    return randomise(model_cls(config))


@pytest.mark.parametrize("name, prefix", [("dinov2-base", 1), ("dinov2-base-reg", 5)])
def test_dinov2_tokens_match_transformers_forward(hub_cache: Path, name: str, prefix: int) -> None:
    ref = reference_dinov2(with_registers=prefix == 5)
    save_dinov2_snapshot(ref, snapshot_dir(hub_cache, get_spec(name).hub_id))
    spec = variant(name, depth=2, width=64)
    backbone = FrozenBackbone(spec, spec.builder(spec=spec))

    rng = np.random.default_rng(2)
    pixels = backbone.preprocess([rng.random((230, 250, 3), dtype=np.float32) for _ in range(2)])
    raw = backbone.patch_tokens(pixels, [0, 1])
    normed = backbone.patch_tokens(pixels, [0, 1], final_norm=True)
    hooked = block_outputs(ref.encoder.layer, lambda: ref(pixel_values=pixels), [0, 1])
    with torch.no_grad():
        last = ref(pixel_values=pixels).last_hidden_state
        for b in (0, 1):
            assert raw[b].shape == (2, 256, 64)
            torch.testing.assert_close(raw[b], hooked[b][:, prefix:], atol=ATOL, rtol=0)
            torch.testing.assert_close(normed[b], ref.layernorm(hooked[b])[:, prefix:], atol=ATOL, rtol=0)
            assert not torch.allclose(normed[b], raw[b], atol=1e-3)
    torch.testing.assert_close(normed[1], last[:, prefix:], atol=ATOL, rtol=0)
    assert backbone.provenance(blocks=[1], final_norm=False)["resolved_revision"] == SHA


def test_dinov2_unexpected_checkpoint_key_fails(hub_cache: Path) -> None:
    from safetensors.torch import save_file

    ref = reference_dinov2(with_registers=False)
    folder = snapshot_dir(hub_cache, "facebook/dinov2-base")
    ref.config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    save_file({**{k: v.contiguous() for k, v in ref.state_dict().items()}, "head.weight": torch.zeros(3, 64)},
              str(folder / "model.safetensors"))
    spec = variant("dinov2-base", depth=2, width=64)
    with pytest.raises(CheckpointMismatchError, match="head.weight"):
        spec.builder(spec=spec)


def test_pinned_weight_hash_is_checked(hub_cache: Path) -> None:
    folder = snapshot_dir(hub_cache, "facebook/dinov2-with-registers-base")
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2_with_registers"}))
    (folder / "model.safetensors").write_bytes(b"not the published weights")
    (folder / "preprocessor_config.json").write_text(json.dumps(DINOV2_PROCESSOR))
    spec = dataclasses.replace(variant("dinov2-base-reg"), weights_sha256="7a6f7b3b")
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        spec.builder(spec=spec)


# --------------------------------------------------------------------------- open_clip image towers


def open_clip_vit_config(image_size: int = 64, mean: tuple = OPENAI_CLIP_MEAN) -> dict:
    return {
        "model_cfg": {
            "embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {"mean": list(mean), "std": list(OPENAI_CLIP_STD), "size": image_size},
    }


def test_open_clip_vit_tokens_match_open_clip(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip
    from safetensors.torch import save_file

    config = open_clip_vit_config()
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**config["model_cfg"]).eval()  # QuickGELU, text tower included, as on the Hub
    folder = snapshot_dir(hub_cache, "hf-hub:redlessone/DermLIP_ViT-B-16")
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    spec = variant("dermlip-vitb16", depth=2, width=64, image_size=64)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)

    with pytest.raises(RevisionRequiredError):
        load_backbone(spec.name)
    backbone = load_backbone(spec.name, revision=SHA)
    assert not any(name.startswith("text") for name, _ in backbone.model.named_parameters())

    pixels = backbone.preprocess(grey_images(2, 64))
    raw = backbone.patch_tokens(pixels, [0, 1])
    normed = backbone.patch_tokens(pixels, [0, 1], final_norm=True)
    with torch.no_grad():
        for final_norm, got in ((False, raw), (True, normed)):
            want = ref.visual.forward_intermediates(pixels, indices=[0, 1], normalize_intermediates=final_norm,
                                                    intermediates_only=True, output_fmt="NLC")["image_intermediates"]
            for b in (0, 1):
                assert got[b].shape == (2, 16, 64)
                torch.testing.assert_close(got[b], want[b], atol=ATOL, rtol=0)
        ref.visual.output_tokens = True
        _, tokens = ref.visual(pixels)  # ln_post on all tokens, CLS removed by open_clip itself
    torch.testing.assert_close(normed[1], tokens, atol=ATOL, rtol=0)
    assert not torch.allclose(normed[0], raw[0], atol=1e-3)

    prov = backbone.provenance(blocks=[0], final_norm=False)
    assert prov["pinned_revision"] is None and not prov["revision_pinned"]
    assert prov["resolved_revision"] == SHA and prov["revision"] == SHA  # the record stores the commit served


def test_open_clip_preprocessing_must_match_registry(hub_cache: Path) -> None:
    folder = snapshot_dir(hub_cache, "hf-hub:timm/vit_base_patch16_clip_224.openai")
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_vit_config(224, mean=(0.485, 0.456, 0.406))))
    (folder / "open_clip_model.safetensors").write_bytes(b"unused")
    spec = variant("clip-vitb16-openai")
    with pytest.raises(ValueError, match="mean"):
        spec.builder(spec=spec)


def test_biomedclip_timm_trunk_tokens_match_timm(hub_cache: Path) -> None:
    from open_clip.timm_model import TimmModel

    vision_cfg = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "image_size": 224}
    text_cfg = {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "context_length": 256}
    config = {"model_cfg": {"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
              "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}}
    torch.manual_seed(0)
    ref = randomise(TimmModel("vit_tiny_patch16_224", embed_dim=32, image_size=224, pool="", proj="linear"))
    state = {"visual." + k: v for k, v in ref.state_dict().items()}
    state.update({"text.proj.0.weight": torch.randn(32, 8), "logit_scale": torch.tensor(4.6)})  # ignored
    folder = snapshot_dir(hub_cache, get_spec("biomedclip").hub_id)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    spec = variant("biomedclip", width=192)  # vit_tiny: 12 blocks of width 192, same timm class as ViT-B

    backbone = FrozenBackbone(spec, spec.builder(spec=spec))
    rng = np.random.default_rng(3)
    pixels = backbone.preprocess([rng.random((200, 240, 3), dtype=np.float32)])
    raw = backbone.patch_tokens(pixels, [3, 11])
    normed = backbone.patch_tokens(pixels, [3, 11], final_norm=True)
    hooked = block_outputs(ref.trunk.blocks, lambda: ref.trunk.forward_features(pixels), [3, 11])
    with torch.no_grad():
        full = ref.trunk.forward_features(pixels)
        for b in (3, 11):
            assert raw[b].shape == (1, 196, 192)
            torch.testing.assert_close(raw[b], hooked[b][:, 1:], atol=ATOL, rtol=0)
            torch.testing.assert_close(normed[b], ref.trunk.norm(hooked[b])[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(normed[11], full[:, 1:], atol=ATOL, rtol=0)
    assert not torch.allclose(normed[3], raw[3], atol=1e-3)
