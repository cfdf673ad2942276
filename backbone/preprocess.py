"""Image preprocessing through each model library's own transform.

Every backbone is fed by the transform its library builds from the model's own data config:

* timm: ``timm.data.resolve_model_data_config(model)`` + ``timm.data.create_transform(..., is_training=False)``;
* transformers: ``AutoImageProcessor.from_pretrained(<snapshot>)`` (the ``preprocessor_config.json`` of the
  pinned commit), called on PIL images;
* open_clip: ``open_clip.image_transform`` with the ``preprocess_cfg`` of the snapshot's ``open_clip_config.json``
  merged over open_clip's defaults (``open_clip.transform.merge_preprocess_dict``), as
  ``open_clip.create_model_and_transforms`` does.

Mean, std, interpolation and the resize implementation are the library's. One geometric override is the kit's:
**squash, no crop** (timm ``crop_mode="squash", crop_pct=1``; transformers ``do_center_crop=False`` with an exact
``height``/``width``; open_clip ``resize_mode="squash"``). Lesion masks are pooled over the whole image onto the
token grid (:func:`covtoken.eval.labels.token_lesion_fraction`), so the image must map onto the whole grid, and a
centre crop would cut away lesions at the border. The library's native geometry (crop fraction, shortest-edge
size) is recorded next to the override in :meth:`LibraryTransform.provenance`.

Input images (the common layout: ``(H, W)`` grey or ``(H, W, 3)`` RGB floats in [0, 1]) are handed to the library as
the 8-bit PIL images its transform is written for: ``round(255 * x)`` as ``uint8``. Grey images (CT, MR, X-ray,
ultrasound) become RGB by repeating the grey channel three times (PIL ``Image.convert("RGB")`` of an ``"L"``
image), which is how every supported backbone was shown grey images in training. For CT windowed over 2000 HU
(MedDINOv3) one 8-bit level is 7.8 HU.

A batch whose images already have the model's square input size skips the per-image PIL round trip when the
library's transform allows it (timm's eval ``Compose`` of ``Resize``, ``CenterCrop``, ``MaybeToTensor``,
``Normalize``, see :func:`timm_transform`): at that size torchvision's ``Resize`` and ``CenterCrop`` return their
input, so the same 8-bit levels are converted as ``to_tensor`` converts them (``/ 255`` in float32) and the
library's own ``Compose`` runs once on the batch. The result is bit-identical to the per-image path (tested); on
the embedded tiny ViT it is what keeps preprocessing from competing with the forward pass for the GIL.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["LibraryTransform", "to_pil", "to_uint8", "timm_transform", "transformers_transform", "open_clip_transform",
           "attach_preprocess", "PREPROCESS_ATTR", "GREY_TO_RGB"]

#: Attribute a builder sets on the module it returns to carry the library transform (see attach_preprocess).
PREPROCESS_ATTR = "covtoken_preprocess"
GREY_TO_RGB = "grey (H, W) -> PIL 'L' -> convert('RGB'): the grey channel repeated three times"
_RANGE_TOL = 1e-6


def to_pil(img: np.ndarray, *, index: int = 0) -> Image.Image:
    """One image of the common layout as an 8-bit RGB PIL image (grey repeated to three channels).

    Raises:
        ValueError: wrong shape, NaN, or values outside [0, 1] (naming the image index).
    """
    u8 = to_uint8(img, index=index)
    return Image.fromarray(u8, mode="L").convert("RGB") if u8.ndim == 2 else Image.fromarray(u8, mode="RGB")


def to_uint8(img: np.ndarray, *, index: int = 0) -> np.ndarray:
    """One image of the common layout as ``round(255 x)`` ``uint8`` ``(H, W)`` or ``(H, W, 3)``, checked as in
    :func:`to_pil`."""
    return _stack_levels([img], first=index)[0].astype(np.uint8)


def _stack_levels(images: Sequence[np.ndarray], *, first: int = 0) -> np.ndarray:
    """Same-shaped images as one ``(B, H, W[, 3])`` float32 array of their 8-bit levels ``round(255 x)`` (whole
    numbers 0..255, the values :func:`to_uint8` casts), each checked as :func:`to_pil` checks it (the error names
    the first bad image's index).

    One copy of the batch, then every step in place; the range check reads each image's minimum and maximum, which
    are NaN or infinite whenever any pixel is.
    """
    arr = np.stack([np.asarray(img, dtype=np.float32) for img in images])
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] != 3):
        raise ValueError(f"image {first} must be (H, W) or (H, W, 3), got {arr.shape[1:]}")
    flat = arr.reshape(len(arr), -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    finite = np.isfinite(lo) & np.isfinite(hi)
    if not finite.all():
        raise ValueError(f"image {first + int(np.argmin(finite))} has NaN/Inf pixels")
    bad = (lo < -_RANGE_TOL) | (hi > 1 + _RANGE_TOL)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"image {first + i} has pixels in [{float(lo[i]):.4g}, {float(hi[i]):.4g}]; the common "
                         "layout is floats in [0, 1]")
    np.clip(arr, 0.0, 1.0, out=arr)
    arr *= 255.0
    return np.rint(arr, out=arr)


@dataclass(frozen=True)
class LibraryTransform:
    """A library's transform of one PIL image to a ``(3, S, S)`` float tensor, and how it was resolved.

    Attributes:
        library: ``timm``, ``transformers`` or ``open_clip``.
        api: the public call that built the transform.
        native: the library's own data config for this model (before the kit's override).
        override: what the kit changed (geometry only).
        resolved: the configuration actually applied (mean, std, interpolation, size, ...).
        fn: PIL images -> ``(B, 3, S, S)`` float32 tensor.
        batched: ``(B, S, S[, 3])`` float32 8-bit levels (:func:`_stack_levels`) -> the same tensor as ``fn``
            gives, in one call (None: the transform has no such path; see the module docstring).
        side: the input side ``S`` of ``batched``.
    """

    library: str
    api: str
    native: dict[str, Any]
    override: dict[str, Any]
    resolved: dict[str, Any]
    fn: Callable[[Sequence[Image.Image]], torch.Tensor] = field(repr=False, compare=False)
    text: str = ""
    batched: Callable[[np.ndarray], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    side: int | None = None

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        if not len(images):
            raise ValueError("no images to preprocess")
        if self.takes_batch_path(images):
            return self.batched(_stack_levels(images))
        return self.fn([to_pil(img, index=i) for i, img in enumerate(images)])

    def takes_batch_path(self, images: Sequence[np.ndarray]) -> bool:
        """True when ``images`` (all of one shape, already ``S x S``) go through ``batched``, not PIL one by one."""
        if self.batched is None:
            return False
        shapes = {np.shape(img) for img in images}
        return len(shapes) == 1 and next(iter(shapes))[:2] == (self.side, self.side)

    def provenance(self) -> dict[str, Any]:
        """The ``preprocess`` block of a record's backbone provenance (JSON-safe)."""
        return json.loads(json.dumps({
            "library": self.library, "api": self.api, "native": self.native, "override": self.override,
            "resolved": self.resolved, "transform": self.text,
            "input": "float [0, 1] -> uint8 round(255 x) PIL image", "grey": GREY_TO_RGB,
        }, default=str))


def attach_preprocess(model: torch.nn.Module, transform: LibraryTransform) -> torch.nn.Module:
    """Record on ``model`` the library transform its builder resolved (read by FrozenBackbone)."""
    setattr(model, PREPROCESS_ATTR, transform)
    return model


def _check_norm(name: str, resolved: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> None:
    bad = {k: (tuple(resolved[k]), tuple(v)) for k, v in (("mean", mean), ("std", std))
           if not np.allclose(np.asarray(resolved[k], dtype=np.float64), np.asarray(v, dtype=np.float64),
                              rtol=0, atol=1e-7)}
    if bad:
        raise ValueError(f"{name}: the library's preprocessing disagrees with the registry (library, registry): {bad}")


def timm_transform(model: torch.nn.Module, *, name: str, image_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> LibraryTransform:
    """timm's eval transform resolved from ``model``'s pretrained config, squashed to ``image_size`` (no crop)."""
    from timm.data import create_transform, resolve_model_data_config

    native = dict(resolve_model_data_config(model))
    cfg = dict(native, input_size=(3, image_size, image_size), crop_pct=1.0, crop_mode="squash")
    _check_norm(name, cfg, mean, std)
    tf = create_transform(**cfg, is_training=False)
    return LibraryTransform(
        library="timm", api="timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
        native=native, override={"input_size": [3, image_size, image_size], "crop_pct": 1.0, "crop_mode": "squash"},
        resolved=cfg, fn=lambda ims: torch.stack([tf(im) for im in ims]), text=repr(tf),
        batched=_batched_at_input_size(tf, image_size), side=image_size)


def _batched_at_input_size(tf: Any, side: int) -> Callable[[np.ndarray], torch.Tensor] | None:
    """The batch path of a timm eval transform for ``side x side`` images, or None when ``tf`` is not exactly
    ``Compose([Resize((S, S)), CenterCrop((S, S)), MaybeToTensor(), Normalize(...)])`` (a plain ``ToTensor`` cannot
    take a tensor, so such a transform keeps the per-image path).

    At ``S x S`` torchvision's ``Resize`` returns its input unchanged and ``CenterCrop`` crops nothing, for PIL images
    and tensors alike; ``MaybeToTensor`` passes a tensor through. So the 8-bit levels are converted the way
    ``to_tensor`` converts an 8-bit image (channels first, ``float32 / 255``; grey repeated to RGB as PIL's
    ``convert("RGB")`` does) and the library's own ``Compose`` is applied once to the whole batch. Grey is repeated
    after the division, as a view: the library's ``Normalize`` writes its result to a copy of three channels (an
    in-place ``Normalize`` is given a copy first).
    """
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms as T

    steps = getattr(tf, "transforms", None)
    kinds = (T.Resize, T.CenterCrop, MaybeToTensor, T.Normalize)
    if not isinstance(tf, T.Compose) or len(steps) != 4 or not all(isinstance(t, k) for t, k in zip(steps, kinds)):
        return None
    if tuple(np.atleast_1d(steps[0].size)) not in ((side,), (side, side)) or steps[0].max_size is not None \
            or tuple(np.atleast_1d(steps[1].size)) not in ((side,), (side, side)):
        return None

    def run(levels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(levels).to(torch.get_default_dtype()).div_(255)  # to_tensor's float / 255 of a level
        if x.ndim == 3:  # grey, repeated to RGB after the division (the library's Normalize copies its input)
            x = x[:, None].expand(-1, 3, -1, -1)
            if steps[3].inplace:
                x = x.contiguous()
        else:
            x = x.permute(0, 3, 1, 2).contiguous()
        return tf(x).contiguous()

    return run


def transformers_transform(folder: str | Path, *, name: str, image_size: int, mean: Sequence[float],
                           std: Sequence[float]) -> LibraryTransform:
    """``AutoImageProcessor`` of the snapshot folder, resizing to ``image_size`` squared without centre crop."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    native = {k: v for k, v in proc.to_dict().items() if not k.startswith("_")}
    override = {"do_center_crop": False, "size": {"height": image_size, "width": image_size}}
    resolved = dict(native, **override, processor_class=type(proc).__name__)
    resolved["mean"], resolved["std"] = list(proc.image_mean), list(proc.image_std)
    _check_norm(name, resolved, mean, std)

    def fn(ims: Sequence[Image.Image]) -> torch.Tensor:
        return proc(images=list(ims), return_tensors="pt", **override)["pixel_values"].float()

    return LibraryTransform(library="transformers", api="transformers.AutoImageProcessor.from_pretrained(snapshot)",
                            native=native, override=override, resolved=resolved, fn=fn, text=repr(proc))


def open_clip_transform(preprocess_cfg: dict[str, Any], *, name: str, image_size: int, mean: Sequence[float],
                        std: Sequence[float]) -> LibraryTransform:
    """open_clip's eval ``image_transform`` from a config's ``preprocess_cfg``, with ``resize_mode="squash"``."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    native = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg or {})
    size = native["size"] if isinstance(native["size"], int) else tuple(native["size"])
    if size not in (image_size, (image_size, image_size)):
        raise ValueError(f"{name}: open_clip preprocessing size {size} disagrees with the registry's {image_size}")
    resolved = dict(native, size=image_size, resize_mode="squash")
    _check_norm(name, resolved, mean, std)
    tf = open_clip.image_transform(image_size, is_train=False, mean=tuple(resolved["mean"]),
                                   std=tuple(resolved["std"]), resize_mode="squash",
                                   interpolation=resolved["interpolation"], fill_color=resolved["fill_color"])
    return LibraryTransform(library="open_clip", api="open_clip.image_transform(**preprocess_cfg, is_train=False)",
                            native=native, override={"resize_mode": "squash"}, resolved=resolved,
                            fn=lambda ims: torch.stack([tf(im) for im in ims]), text=repr(tf))
