"""Per registered backbone: the kit's pixels equal the library's own preprocessing on a fixed image.

Each backbone is built by the kit's loader from a small random model of the real architecture saved in the layout
of its Hub repository (as in test_backbones_hub.py). The reference transform is built independently through each
library's public entry point (timm ``resolve_model_data_config`` + ``create_transform`` on a separately built
model; transformers ``AutoImageProcessor`` on the snapshot; open_clip ``create_model_and_transforms("local-dir:...")``
or ``image_transform_v2``), applied to the fixed image as an 8-bit PIL image, with the kit's one documented
override (squash to the square input, no crop). Equality is exact.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covtoken.backbone import registry
from covtoken.backbone.frozen import FrozenBackbone, load_backbone
from covtoken.backbone.hub import MEDDINOV3_MEAN, MEDDINOV3_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from covtoken.backbone.preprocess import to_pil
from covtoken.backbone.registry import get_spec, list_backbones
from test_backbones_hub import (SHA, hub_cache, meddinov3_checkpoint, open_clip_vit_config,  # noqa: F401
                                randomise, reference_dinov2, reference_dinov3, save_dinov2_snapshot, snapshot_dir,
                                variant)

#: backbones with a pixel-equality test below; a new registry entry must be added here with its test
COVERED = {"tiny-vit", "tiny-vit-lejepa", "meddinov3-vitb16-ct", "dinov2-base", "dinov2-base-reg", "dermlip-vitb16", "clip-vitb16-openai",
           "biomedclip"}


def fixed_images() -> list[np.ndarray]:
    """A grey (CT-like) and an RGB image of non-square shapes, fixed seed, values on [0, 1]."""
    rng = np.random.default_rng(14)
    grey = rng.random((150, 97), dtype=np.float32)
    grey[20:60, 30:70] = 1.0  # a bright block, so resampling differences show
    rgb = rng.random((83, 121, 3), dtype=np.float32)
    return [grey, rgb]


def library_input(img: np.ndarray) -> Image.Image:
    """What a library user hands the transform: an 8-bit RGB PIL image (grey converted by PIL)."""
    u8 = np.rint(img * 255).astype(np.uint8)
    return Image.fromarray(u8).convert("RGB")


def assert_equal_to(backbone: FrozenBackbone, reference) -> None:
    images = fixed_images()
    got = backbone.preprocess(images)
    want = torch.stack([reference(library_input(im)) for im in images])
    assert got.dtype == torch.float32 and got.shape == want.shape == (2, 3) + (backbone.spec.image_size,) * 2
    assert torch.equal(got, want.float())


def squash_timm(model: torch.nn.Module, size: int, **cfg: object):
    from timm.data import create_transform, resolve_model_data_config

    data = dict(resolve_model_data_config(model), **cfg)
    return create_transform(**dict(data, input_size=(3, size, size), crop_pct=1.0, crop_mode="squash"))


def test_tiny_vit_is_fed_by_timm() -> None:
    import timm

    backbone = load_backbone("tiny-vit")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=128, embed_dim=64, depth=1,
                            num_heads=4, num_classes=0)
    assert_equal_to(backbone, squash_timm(ref, 128))
    prov = backbone.provenance(blocks=[0], final_norm=False)["preprocess"]
    assert prov["library"] == "timm" and prov["native"]["crop_pct"] == 0.9 and prov["override"]["crop_mode"] == "squash"
    assert prov["resolved"]["interpolation"] == "bicubic" and "Resize" in prov["transform"]


def test_tiny_vit_lejepa_is_fed_by_timm_like_its_architecture() -> None:
    """The G8-pretrained tiny ViT (shipped weights, pinned by digest) keeps timm's transform of its architecture."""
    import timm

    backbone = load_backbone("tiny-vit-lejepa")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=128, embed_dim=64, depth=1,
                            num_heads=4, num_classes=0)
    assert_equal_to(backbone, squash_timm(ref, 128))
    assert backbone.provenance(blocks=[0], final_norm=False)["preprocess"]["library"] == "timm"


def test_meddinov3_is_fed_by_timm_with_its_normalisation(hub_cache: Path) -> None:
    ref = reference_dinov3()
    torch.save(meddinov3_checkpoint(ref), snapshot_dir(hub_cache, "ricklisz123/MedDINOv3-ViTB-16-CT-3M") / "model.pth")
    spec = variant("meddinov3-vitb16-ct", depth=2, width=64, image_size=64)
    backbone = FrozenBackbone(spec, spec.builder(spec=spec))
    assert_equal_to(backbone, squash_timm(ref, 64, mean=MEDDINOV3_MEAN, std=MEDDINOV3_STD))
    # the HU normalisation of the MedDINOv3 demo: (HU - 65.108) / 178.017 for a grey pixel at HU = 0 (u = 0.5)
    x = backbone.preprocess([np.full((64, 64), 0.5, dtype=np.float32)])
    torch.testing.assert_close(x, torch.full_like(x, (128 / 255 * 2000 - 1000 - 65.1084213256836) / 178.01663208007812),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["dinov2-base", "dinov2-base-reg"])
def test_dinov2_is_fed_by_its_image_processor(hub_cache: Path, name: str) -> None:
    from transformers import AutoImageProcessor

    folder = save_dinov2_snapshot(reference_dinov2(with_registers=name.endswith("reg")),
                                  snapshot_dir(hub_cache, get_spec(name).hub_id))
    spec = variant(name, depth=2, width=64)
    backbone = FrozenBackbone(spec, spec.builder(spec=spec))
    proc = AutoImageProcessor.from_pretrained(str(folder))
    assert_equal_to(backbone, lambda im: proc(images=im, do_center_crop=False, size={"height": 224, "width": 224},
                                              return_tensors="pt")["pixel_values"][0])
    prov = backbone.provenance(blocks=[0], final_norm=False)["preprocess"]
    assert prov["native"]["do_center_crop"] is True and prov["native"]["size"] == {"shortest_edge": 256}
    assert prov["override"] == {"do_center_crop": False, "size": {"height": 224, "width": 224}}


def _open_clip_snapshot(hub_cache: Path, name: str, image_size: int) -> tuple[Path, registry.BackboneSpec]:
    import open_clip
    from safetensors.torch import save_file

    config = open_clip_vit_config(image_size)
    torch.manual_seed(0)
    ref = open_clip.CLIP(**config["model_cfg"]).eval()
    folder = snapshot_dir(hub_cache, get_spec(name).hub_id)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    spec = variant(name, depth=2, width=64, image_size=image_size)
    return folder, spec


@pytest.mark.parametrize("name", ["dermlip-vitb16", "clip-vitb16-openai"])
def test_open_clip_vit_is_fed_by_open_clip_preprocess(hub_cache: Path, name: str) -> None:
    import open_clip

    folder, spec = _open_clip_snapshot(hub_cache, name, 64)
    backbone = FrozenBackbone(spec, spec.builder(spec=spec, **({} if spec.revision_pinned else {"revision": SHA})))
    _, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(folder),
                                                             image_resize_mode="squash")
    assert_equal_to(backbone, preprocess)
    prov = backbone.provenance(blocks=[0], final_norm=False)["preprocess"]
    assert prov["native"]["resize_mode"] == "shortest" and prov["override"] == {"resize_mode": "squash"}


def test_biomedclip_is_fed_by_open_clip_preprocess(hub_cache: Path) -> None:
    from open_clip.transform import image_transform_v2
    from open_clip.timm_model import TimmModel
    from open_clip.transform import PreprocessCfg

    vision_cfg = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "image_size": 224}
    text_cfg = {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "context_length": 256}
    preprocess_cfg = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}
    config = {"model_cfg": {"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
              "preprocess_cfg": preprocess_cfg}
    torch.manual_seed(0)
    ref = randomise(TimmModel("vit_tiny_patch16_224", embed_dim=32, image_size=224, pool="", proj="linear"))
    folder = snapshot_dir(hub_cache, get_spec("biomedclip").hub_id)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save({"visual." + k: v for k, v in ref.state_dict().items()}, folder / "open_clip_pytorch_model.bin")
    spec = variant("biomedclip", width=192)
    backbone = FrozenBackbone(spec, spec.builder(spec=spec))
    assert_equal_to(backbone, image_transform_v2(PreprocessCfg(**preprocess_cfg, resize_mode="squash"), is_train=False))


def test_every_registered_backbone_has_a_pixel_test() -> None:
    registered = {n for n in list_backbones() if not n.startswith("test-")}
    assert registered == COVERED, f"no pixel-equality test for {sorted(registered - COVERED)}"


# --------------------------------------------------------------------------- attacks


def test_grey_is_repeated_to_three_channels() -> None:
    backbone = load_backbone("tiny-vit")
    grey = fixed_images()[0]
    x = backbone.preprocess([grey])
    rgb = backbone.preprocess([np.repeat(grey[:, :, None], 3, axis=2)])
    assert torch.equal(x, rgb) and torch.equal(x[:, 0], x[:, 2])
    assert to_pil(grey).mode == "RGB"


@pytest.mark.parametrize("bad, match", [(np.full((8, 8), 1.5, np.float32), r"\[0, 1\]"),
                                        (np.full((8, 8), np.nan, np.float32), "NaN"),
                                        (np.zeros((8, 8, 4), np.float32), "must be")])
def test_bad_pixels_fail_naming_the_image(bad: np.ndarray, match: str) -> None:
    backbone = load_backbone("tiny-vit")
    with pytest.raises(ValueError, match=match) as err:
        backbone.preprocess([np.zeros((8, 8), np.float32), bad])
    assert "image 1" in str(err.value)


def test_registry_mean_must_agree_with_the_library() -> None:
    spec = get_spec("tiny-vit")
    wrong = dataclasses.replace(spec, name="test-wrong-mean", mean=(0.485, 0.456, 0.406))
    with pytest.raises(ValueError, match="mean"):
        FrozenBackbone(wrong, spec.builder(spec=spec)).preprocess([np.zeros((8, 8), np.float32)])


# --------------------------------------------------------------------------- the batch path at the input size


def _per_image(transform, images: list[np.ndarray]) -> torch.Tensor:
    return transform.fn([to_pil(im) for im in images])


@pytest.mark.parametrize("model_name, size", [("vit_tiny_patch16_224", 128), ("resnet18", 48)])
def test_batch_path_is_bit_identical_to_the_library_per_image(model_name: str, size: int) -> None:
    """Images already at the input size skip PIL: the same pixels as the library's per-image transform, bit for bit,
    grey and RGB, with a per-channel normalisation (resnet18: ImageNet mean and std) and the extremes 0 and 1."""
    import timm

    from covtoken.backbone.preprocess import timm_transform

    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    data = timm.data.resolve_model_data_config(model)
    tf = timm_transform(model, name=model_name, image_size=size, mean=data["mean"], std=data["std"])
    assert tf.batched is not None
    rng = np.random.default_rng(7)
    for shape in ((size, size), (size, size, 3)):
        images = [rng.random(shape, dtype=np.float32) for _ in range(5)]
        images[0][:] = 0.0
        images[1][:] = 1.0
        images[2][: size // 2] = 0.5 / 255  # exactly half an 8-bit level: rounding must match
        assert tf.takes_batch_path(images)
        got = tf(images)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, _per_image(tf, images)), shape
        assert len({tuple(c.tolist()) for c in got.mean(dim=(2, 3))}) > 1  # the images differ


def test_other_sizes_and_mixed_batches_take_the_library_per_image_path() -> None:
    tf = load_backbone("tiny-vit").transform
    small, square = np.zeros((64, 64), np.float32), np.zeros((128, 128), np.float32)
    assert not tf.takes_batch_path([small])
    assert not tf.takes_batch_path([square, np.zeros((128, 128, 3), np.float32)])
    assert torch.equal(tf([square, small]), _per_image(tf, [square, small]))


def test_the_batch_path_names_the_bad_image() -> None:
    tf = load_backbone("tiny-vit").transform
    images = [np.zeros((128, 128), np.float32) for _ in range(4)]
    images[2] = images[2].copy()
    images[2][5, 5] = np.nan
    assert tf.takes_batch_path(images)
    with pytest.raises(ValueError, match="image 2 has NaN"):
        tf(images)
    images[2][5, 5] = 1.5
    with pytest.raises(ValueError, match=r"image 2 has pixels in \[0, 1.5\]"):
        tf(images)


def test_a_transform_with_another_step_has_no_batch_path() -> None:
    from torchvision import transforms as T

    from covtoken.backbone.preprocess import _batched_at_input_size

    tf = load_backbone("tiny-vit").transform
    assert _batched_at_input_size(T.Compose([T.Resize((128, 128)), T.ToTensor()]), 128) is None
    extra = T.Compose([T.Resize((128, 128)), T.CenterCrop((128, 128)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3),
                       T.RandomHorizontalFlip()])
    assert _batched_at_input_size(extra, 128) is None
    plain = T.Compose([T.Resize((128, 128)), T.CenterCrop((128, 128)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    assert _batched_at_input_size(plain, 128) is None  # ToTensor cannot take the batch tensor
    assert _batched_at_input_size(T.Compose([T.Resize((96, 96)), T.CenterCrop((96, 96)), T.ToTensor(),
                                             T.Normalize([0.5] * 3, [0.5] * 3)]), 128) is None
    assert tf.batched is not None


def test_an_in_place_normalize_on_the_batch_path_equals_the_library_per_image() -> None:
    """Grey batches are repeated to RGB as a view; a transform whose ``Normalize`` writes in place must be given a
    copy, or it would normalise the shared channel three times."""
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms as T

    from covtoken.backbone.preprocess import _batched_at_input_size, _stack_levels

    tf = T.Compose([T.Resize((32, 32)), T.CenterCrop((32, 32)), MaybeToTensor(),
                    T.Normalize([0.2, 0.4, 0.6], [0.3, 0.2, 0.1], inplace=True)])
    batched = _batched_at_input_size(tf, 32)
    assert batched is not None
    rng = np.random.default_rng(3)
    for shape in ((32, 32), (32, 32, 3)):
        images = [rng.random(shape, dtype=np.float32) for _ in range(3)]
        got = batched(_stack_levels(images))
        want = torch.stack([tf(to_pil(im)) for im in images])
        assert torch.equal(got, want), shape
