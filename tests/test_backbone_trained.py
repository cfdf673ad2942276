"""The LeJEPA-pretrained tiny ViT is a registered backbone pinned by the sha256 of its shipped weights file."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from covtoken.backbone.embed import embed_images
from covtoken.backbone.frozen import load_backbone
from covtoken.backbone.registry import get_spec, list_backbones
from covtoken.backbone.trained import WEIGHTS_FILE, WEIGHTS_SHA256


def test_shipped_weights_match_the_pinned_digest_and_are_small():
    assert "tiny-vit-lejepa" in list_backbones()
    data = WEIGHTS_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == WEIGHTS_SHA256 == get_spec("tiny-vit-lejepa").weights_sha256
    assert len(data) <= 5 * 2**20


def test_it_loads_differs_from_random_init_and_embeds():
    bb = load_backbone("tiny-vit-lejepa")
    assert bb.weights_digest != load_backbone("tiny-vit").weights_digest
    assert bb.source["files"] == {WEIGHTS_FILE.name: f"sha256:{WEIGHTS_SHA256}"}
    z = embed_images(bb, [np.random.default_rng(0).random((128, 128), dtype=np.float32)])
    assert z.shape == (1, 64) and np.isfinite(z).all()


def test_a_tampered_weights_file_is_refused(tmp_path):
    bad = tmp_path / "w.safetensors"
    data = bytearray(WEIGHTS_FILE.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_backbone("tiny-vit-lejepa", weights=bad)


def test_the_model_card_names_the_weights_digest():
    card = (WEIGHTS_FILE.parent / "tiny-vit-lejepa.md").read_text()
    assert WEIGHTS_SHA256 in card and "flow check" in card
