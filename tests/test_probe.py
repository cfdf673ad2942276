"""Probe heads (identity start, training on stable pairs), checkpoints (DermaJEPA npz, safetensors) and the pooled
image embedding, against direct numpy formulas and the libraries' own forward functions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from covtoken.arch.probe import (HeadConfig, change_score, init_params, l2_normalise, predict, stable_pair_loss,
                                 train_probe)
from covtoken.arch.probe_io import (SCHEMA_VERSION, CheckpointError, ProbeCheckpoint, load_dermajepa_npz, load_probe,
                                    save_probe)
from covtoken.backbone.embed import embed_images, embedding_model_id, image_embedding, preprocess_batch
from covtoken.backbone.frozen import FrozenBackbone, load_backbone
from covtoken.backbone.registry import get_spec


def stable_embeddings(n: int = 256, d: int = 16, seed: int = 0):
    """Targets = a fixed near-identity linear map of the contexts plus noise: learnable, not the identity."""
    rng = np.random.default_rng(seed)
    zc = l2_normalise(rng.normal(size=(n, d)))
    m = np.eye(d) + 0.6 * rng.normal(size=(d, d)) / np.sqrt(d)
    zt = l2_normalise(zc @ m + 0.05 * rng.normal(size=(n, d)))
    return zc, zt


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_identity_start_equals_raw_cosine(kind):
    zc, zt = stable_embeddings()
    params = init_params(kind, 16, seed=3)
    raw = 1.0 - np.einsum("nd,nd->n", zc.astype(np.float64), zt)  # both unit-norm: cosine = dot product
    np.testing.assert_allclose(change_score(kind, params, zc, zt), raw, atol=1e-6)
    untrained = train_probe(zc, zt, HeadConfig(kind=kind, epochs=0), seed=0)
    np.testing.assert_allclose(change_score(kind, untrained.params, zc, zt), raw, atol=1e-6)


@pytest.mark.parametrize("kind,optimizer,lr", [("linear", "sgd", 0.5), ("linear", "adam", 0.01),
                                               ("mlp", "sgd", 0.5), ("mlp", "adam", 0.01)])
def test_training_reduces_the_stable_pair_loss(kind, optimizer, lr):
    zc, zt = stable_embeddings()
    head = HeadConfig(kind=kind, optimizer=optimizer, lr=lr, epochs=30, batch_size=32, anchor=1e-4)
    probe = train_probe(zc, zt, head, seed=1)
    before = stable_pair_loss(kind, init_params(kind, 16, seed=1), zc, zt)
    assert probe.losses[0] == pytest.approx(before, abs=1e-6)
    assert probe.losses[-1] == pytest.approx(stable_pair_loss(kind, probe.params, zc, zt), abs=1e-5)
    assert probe.losses[-1] < 0.6 * before, probe.losses[[0, -1]]
    again = train_probe(zc, zt, head, seed=1)
    assert all(np.array_equal(probe.params[k], again.params[k]) for k in probe.params)  # deterministic
    other = train_probe(zc, zt, head, seed=2)
    assert not all(np.array_equal(probe.params[k], other.params[k]) for k in probe.params)  # seed = batch order


def test_predictor_formulas_and_input_checks():
    rng = np.random.default_rng(1)
    z = l2_normalise(rng.normal(size=(5, 4)))
    w, b = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    np.testing.assert_allclose(predict("linear", {"weight": w, "bias": b}, z), z @ w + b, atol=1e-6)
    mlp = {"mlp_w1": rng.normal(size=(4, 3)), "mlp_b1": rng.normal(size=3), "mlp_w2": rng.normal(size=(3, 4)),
           "mlp_b2": rng.normal(size=4)}
    want = z + np.maximum(z @ mlp["mlp_w1"] + mlp["mlp_b1"], 0) @ mlp["mlp_w2"] + mlp["mlp_b2"]
    np.testing.assert_allclose(predict("mlp", mlp, z), want, atol=1e-5)
    with pytest.raises(ValueError, match="L2-normalised"):
        train_probe(2 * z, z, HeadConfig(), seed=0)
    with pytest.raises(ValueError, match="dimension 4"):
        predict("linear", {"weight": w, "bias": b}, np.ones((2, 3)))
    with pytest.raises(ValueError, match="optimizer"):
        HeadConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown head config keys"):
        HeadConfig.from_dict({"kind": "linear", "momentum": 0.5})


def dermajepa_npz(path, *, d: int = 8, model: str = "hf-hub:redlessone/DermLIP_ViT-B-16", kind: str | None = "linear",
                  weight_shape: tuple[int, int] | None = None):
    """A checkpoint written the way the published DermaJEPA writer lays it out (np.savez_compressed)."""
    rng = np.random.default_rng(0)
    payload = {"model_id": np.asarray(["derma-jepa-linear"]), "input_embedding_model_id": np.asarray([model]),
               "feature_dim": np.asarray([d], dtype=np.int32)}
    if kind is not None:
        payload["predictor_kind"] = np.asarray([kind])
    if kind == "mlp":
        payload.update(mlp_w1=rng.normal(size=(d, 5)).astype(np.float32), mlp_b1=np.zeros(5, np.float32),
                       mlp_w2=rng.normal(size=(5, d)).astype(np.float32), mlp_b2=np.zeros(d, np.float32),
                       hidden_dim=np.asarray([5], dtype=np.int32))
    else:
        payload.update(weight=rng.normal(size=weight_shape or (d, d)).astype(np.float32),
                       bias=rng.normal(size=d).astype(np.float32))
    np.savez_compressed(path, **payload)
    return path


def test_dermajepa_npz_loads_and_refuses_a_mismatch(tmp_path):
    p = dermajepa_npz(tmp_path / "lin.npz")
    ck = load_dermajepa_npz(p, expected_model_id="redlessone/DermLIP_ViT-B-16", expected_dim=8)
    with np.load(p) as raw:
        z = l2_normalise(np.random.default_rng(2).normal(size=(3, 8)))
        np.testing.assert_allclose(predict(ck.kind, ck.params, z), z @ raw["weight"] + raw["bias"], atol=1e-6)
    assert ck.kind == "linear" and ck.model_id == "derma-jepa-linear"
    with pytest.raises(CheckpointError, match="input_embedding_model_id.*biomedclip"):
        load_dermajepa_npz(p, expected_model_id="biomedclip", expected_dim=8)
    with pytest.raises(CheckpointError, match="feature_dim.*768"):
        load_dermajepa_npz(p, expected_model_id="hf-hub:redlessone/DermLIP_ViT-B-16", expected_dim=768)
    with pytest.raises(CheckpointError, match="weight"):
        load_dermajepa_npz(dermajepa_npz(tmp_path / "bad.npz", weight_shape=(8, 6)), expected_model_id=None,
                           expected_dim=None)
    legacy = load_dermajepa_npz(dermajepa_npz(tmp_path / "old.npz", kind=None), expected_model_id=None, expected_dim=8)
    assert legacy.kind == "linear"  # written before predictor_kind existed
    mlp = load_dermajepa_npz(dermajepa_npz(tmp_path / "mlp.npz", kind="mlp"), expected_model_id=None, expected_dim=8)
    assert mlp.kind == "mlp" and mlp.params["mlp_w1"].shape == (8, 5)
    with pytest.raises(CheckpointError, match="predictor_kind"):
        load_dermajepa_npz(dermajepa_npz(tmp_path / "k.npz", kind="transformer"), expected_model_id=None,
                           expected_dim=None)


def test_safetensors_round_trip_and_schema(tmp_path):
    zc, zt = stable_embeddings(d=8)
    probe = train_probe(zc, zt, HeadConfig(kind="mlp", epochs=2), seed=0)
    ck = ProbeCheckpoint("mlp", 8, "tiny-vit", probe.params, model_id="g7-mlp", metadata={"run_id": "g7-x"})
    path = save_probe(tmp_path / "p.safetensors", ck)
    back = load_probe(path, expected_model_id="tiny-vit", expected_dim=8)
    assert back.kind == "mlp" and back.model_id == "g7-mlp" and back.metadata["schema_version"] == SCHEMA_VERSION
    assert back.metadata["run_id"] == "g7-x"
    assert all(np.array_equal(back.params[k], probe.params[k]) for k in probe.params)
    with pytest.raises(FileExistsError):
        save_probe(path, ck)
    with pytest.raises(CheckpointError, match="input_embedding_model_id"):
        load_probe(path, expected_model_id="clip-vitb16-openai", expected_dim=8)
    with pytest.raises(CheckpointError, match="feature_dim"):
        load_probe(path, expected_model_id="tiny-vit", expected_dim=64)
    from safetensors.numpy import save_file

    save_file(dict(probe.params), str(tmp_path / "old.safetensors"), metadata={"schema_version": "covtoken.probe/0"})
    with pytest.raises(CheckpointError, match="predictor_kind|schema_version"):
        load_probe(tmp_path / "old.safetensors", expected_model_id=None, expected_dim=None)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-vit")


def test_preprocess_batch_equals_the_per_image_path(tiny):
    rng = np.random.default_rng(0)
    images = [rng.random((100, 90, 3), dtype=np.float32), rng.random((128, 128), dtype=np.float32),
              rng.random((100, 90, 3), dtype=np.float32), rng.random((60, 200), dtype=np.float32)]
    assert torch.equal(preprocess_batch(tiny, images), tiny.preprocess(images))


def test_timm_embedding_is_the_normed_cls_token(tiny):
    rng = np.random.default_rng(1)
    images = [rng.random((128, 128, 3), dtype=np.float32) for _ in range(3)]
    z = embed_images(tiny, images, batch_size=2)
    with torch.no_grad():
        want = tiny.model.forward_features(tiny.preprocess(images))[:, 0]  # global_pool="token", final norm applied
    np.testing.assert_allclose(z, want.numpy(), atol=1e-5)
    assert embedding_model_id(tiny.spec) == "tiny-vit"


def test_open_clip_embedding_equals_encode_image():
    import open_clip

    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**cfg).eval()
    spec = dataclasses.replace(get_spec("clip-vitb16-openai"), image_size=64, depth=2, width=64)
    bb = FrozenBackbone(spec, ref.visual)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # the tower's input, any pixels
    z = image_embedding(bb, pixels)
    with torch.no_grad():
        torch.testing.assert_close(z, ref.encode_image(pixels), atol=1e-5, rtol=0)
    assert z.shape == (2, 32)  # the projected embedding, not the 64-wide tower width
    assert embedding_model_id(spec) == "timm/vit_base_patch16_clip_224.openai"


def test_transformers_embedding_is_the_pooler_output():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=16)).eval()
    spec = dataclasses.replace(get_spec("dinov2-base"), image_size=32, patch_size=16, depth=1, width=32)
    bb = FrozenBackbone(spec, model)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.layernorm(model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1])[:, 0]
    torch.testing.assert_close(image_embedding(bb, pixels), want, atol=1e-5, rtol=0)
