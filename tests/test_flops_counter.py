"""The analytic MAC count of arch/flops.py against PyTorch's own FLOP counter (torch.utils.flop_counter).

``FlopCounterMode`` counts 2 FLOPs per multiply-accumulate of every matmul, convolution and scaled-dot-product
attention a forward dispatches; the analytic count must equal half its total exactly, on the embedded tiny ViT and
on a ViT-B/16 at 224 px (built on the meta device, so no arithmetic runs) - and on the DINOv3-style ViT with
registers, whose prefix tokens change N.

Attention runs with the MATH kernel of ``F.scaled_dot_product_attention`` (``torch.nn.attention.sdpa_kernel``): on
CPU the default dispatches to ``_scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode (torch 2.14)
does not count - :func:`test_flop_counter_misses_the_cpu_flash_kernel` pins that difference, exactly the 2 N^2 d
attention term per block, so a future torch that counts it shows up here.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from covtoken.arch.flops import ViTGeometry, vit_macs
from covtoken.backbone.frozen import load_backbone


def counted_macs(model: torch.nn.Module, x: torch.Tensor, *, math_sdpa: bool = True) -> int:
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = sdpa_kernel(SDPBackend.MATH) if math_sdpa else nullcontext()
    with torch.no_grad(), kernel, FlopCounterMode(display=False) as fc:
        model.forward_features(x)
    total = fc.get_total_flops()
    assert total % 2 == 0
    return total // 2


def test_tiny_vit_analytic_equals_flop_counter() -> None:
    bb = load_backbone("tiny-vit")
    s = bb.spec
    x = torch.zeros(2, 3, s.image_size, s.image_size)
    analytic = vit_macs(image_size=s.image_size, patch_size=s.patch_size, width=s.width, depth=s.depth,
                        num_prefix=s.num_prefix_tokens)
    assert counted_macs(bb.model, x) == 2 * analytic
    geo = ViTGeometry.from_model(bb.model, n_patches=s.grid[0] * s.grid[1], num_prefix=s.num_prefix_tokens)
    assert geo.full_macs(2) == 2 * analytic


@pytest.mark.parametrize("arch, prefix", [("vit_base_patch16_224", 1), ("vit_base_patch16_dinov3", 5)])
def test_vit_b16_analytic_equals_flop_counter(arch: str, prefix: int) -> None:
    import timm

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=224)
        x = torch.empty(1, 3, 224, 224)
    assert model.num_prefix_tokens == prefix
    analytic = vit_macs(image_size=224, patch_size=16, width=768, depth=12, num_prefix=prefix)
    assert counted_macs(model, x) == analytic
    if prefix == 1:
        assert abs(analytic / 1e9 - 17.56) < 0.01  # timm lists 17.58 GMACs (it counts the head and norms too)


def test_flop_counter_misses_the_cpu_flash_kernel() -> None:
    bb = load_backbone("tiny-vit")
    s = bb.spec
    n = s.grid[0] * s.grid[1] + 1
    x = torch.zeros(1, 3, s.image_size, s.image_size)
    missing = counted_macs(bb.model, x) - counted_macs(bb.model, x, math_sdpa=False)
    assert missing in (0, s.depth * 2 * n * n * s.width)


def test_the_counter_sees_a_wrong_analytic_count() -> None:
    """The attack: an analytic count that forgets the attention term (2 N^2 d) no longer matches."""
    bb = load_backbone("tiny-vit")
    s = bb.spec
    n = s.grid[0] * s.grid[1] + 1
    analytic = vit_macs(image_size=s.image_size, patch_size=s.patch_size, width=s.width, depth=s.depth)
    counted = counted_macs(bb.model, torch.zeros(1, 3, s.image_size, s.image_size))
    assert counted != analytic - s.depth * 2 * n * n * s.width
