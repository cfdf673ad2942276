"""One registry from backbone names to frozen-model builders, with their preprocessing and pinned revision.

Every backbone the kit can use is a :class:`BackboneSpec` registered here under a short name. A spec says
where the weights come from (library, Hub id, pinned revision), how images are prepared (square input size and
the mean/std the library's own data config must agree with; the transform itself is the library's, squashed without
crop so lesions at the border are never cut away, see :mod:`covtoken.backbone.preprocess`), and the token geometry (patch
size, depth, width, how many CLS/register tokens precede the patch tokens). Registering a name twice is an
error; looking up an unknown name raises with the list of choices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch

__all__ = ["BackboneSpec", "register", "get_spec", "list_backbones", "UnknownBackboneError", "COMMIT_SHA",
           "pinned_digest_verified", "PinnedWeightsSpec"]

#: A full Hub commit sha; pinned revisions (and revisions passed for unpinned entries) must match it.
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")

Library = Literal["timm", "transformers", "open_clip"]


class UnknownBackboneError(KeyError):
    """A backbone name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one frozen backbone and read its patch tokens.

    Attributes:
        name: registry key.
        library: which maintained library builds the architecture.
        hub_id: Hub repository of the weights (``None`` for the embedded tiny ViT); open_clip ids keep their
            ``hf-hub:`` prefix.
        revision: pinned Hub commit sha of the weights (``None`` for the embedded model, and for Hub entries
            marked ``revision_pinned=False``).
        image_size: square input side in pixels; images are resized (no crop) to it.
        patch_size: patch side in pixels; the token grid is ``image_size // patch_size`` per side.
        depth: number of transformer blocks; block indices are 0-based, ``depth - 1`` is the final block.
        width: token dimension d.
        num_prefix_tokens: CLS + register tokens stripped before patch tokens are returned.
        num_registers: register tokens among the prefix tokens.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        builder: keyword-only callable ``builder(spec=..., weights=...) -> torch.nn.Module``; ``weights`` is a
            local folder or file that replaces the Hub download (used by jobs that mount weights); ``None`` means
            "fetch ``hub_id`` at ``revision``". Hub builders also take ``revision=`` (a 40-hex commit sha that
            replaces the pinned one; required when ``revision_pinned`` is False).
        weights_sha256: optional hex prefix the weight file must match.
        modality: the images this backbone is meant for (documentation only).
        notes: free text (licence, paper).
        licence: the weights' licence as the model card states it (listed by ``covtoken backbones``).
        revision_pinned: False for a Hub entry whose current commit sha could not be established when it was
            registered: ``revision`` is then None and loading needs an explicit ``revision=`` (a job's
            ``--revision``); the commit actually served is recorded either way.
    """

    name: str
    library: Library
    hub_id: str | None
    revision: str | None
    image_size: int
    patch_size: int
    depth: int
    width: int
    num_prefix_tokens: int
    num_registers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    builder: Callable[..., torch.nn.Module] = field(repr=False, compare=False)
    weights_sha256: str | None = None
    modality: str = "any"
    notes: str = ""
    revision_pinned: bool = True
    licence: str = ""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.name}: image_size {self.image_size} is not a multiple of {self.patch_size}")
        if self.revision is not None and not COMMIT_SHA.fullmatch(self.revision):
            raise ValueError(f"{self.name}: revision must be a 40-hex commit sha, got {self.revision!r}")
        if not self.revision_pinned and (self.hub_id is None or self.revision is not None):
            raise ValueError(f"{self.name}: revision_pinned=False is only for Hub entries registered without a revision")
        if self.hub_id is not None and self.revision is None and self.revision_pinned:
            raise ValueError(f"{self.name}: Hub weights {self.hub_id!r} need a pinned revision "
                             "(or revision_pinned=False, so that loading requires an explicit revision)")
        if self.hub_id is not None and self.library == "open_clip" and not self.hub_id.startswith("hf-hub:"):
            raise ValueError(f"{self.name}: open_clip Hub ids must start with 'hf-hub:', got {self.hub_id!r}")
        if self.hub_id is not None and not self.hub_id.removeprefix("hf-hub:").strip("/"):
            raise ValueError(f"{self.name}: empty Hub id")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def provenance(self) -> dict:
        """The fields a gate record stores about this backbone."""
        return {
            "name": self.name,
            "library": self.library,
            "hub_id": self.hub_id,
            "revision": self.revision,
            "revision_pinned": self.revision_pinned,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "depth": self.depth,
            "width": self.width,
            "num_prefix_tokens_stripped": self.num_prefix_tokens,
            "num_registers": self.num_registers,
            "block_index_base": 0,
            "preprocess": {"resize": "square, no crop", "mean": list(self.mean), "std": list(self.std)},
            # FrozenBackbone.provenance replaces this block with the library transform actually resolved
        }


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry; a name can be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``.

    Raises:
        UnknownBackboneError: listing the valid names.
    """
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _load_builtin() -> None:
    # The built-in entries live in their own modules and register themselves on first use.
    from . import hub, tiny  # noqa: F401
    from . import trained  # noqa: F401  (after tiny: it reuses the tiny ViT's spec)


class PinnedWeightsSpec(Protocol):
    """What :func:`pinned_digest_verified` reads of a registry entry: a :class:`BackboneSpec`, or an entry of the
    classifier's registry (``covtoken.classifier.backbones.ClassifierBackboneSpec``), which follows the same rule."""

    name: str
    hub_id: str | None
    revision: str | None
    revision_pinned: bool
    weights_sha256: str | None


def pinned_digest_verified(spec: PinnedWeightsSpec, *, origin: str, resolved_revision: str | None,
                           files: dict[str, str]) -> tuple[bool, str]:
    """Are a model's weights a pinned pretrained checkpoint whose file digest matches the registry?

    The one implementation of this rule, for both registries (frozen backbones and the classifier's).

    The fact the evidence tier rests on. True only when the registry entry records the sha256 of its weight file,
    the weights came from the Hub at exactly the pinned revision (``origin == "hub"``) or from a local file
    (``override:<path>``, e.g. a checkpoint the kit trained and registered by digest), and a weight file read has
    the registry's digest. A random initialisation (no files),
    an entry without a recorded digest, another revision or other bytes are not verified.

    Args:
        spec: the registry entry.
        origin: where the weights came from (``"hub"``, ``"override:<path>"``, ``"embedded"``...).
        resolved_revision: the Hub commit actually served (None for local files).
        files: weight file name -> ``"sha256:<hex>"`` of the files read.

    Returns:
        ``(verified, reason)``; the reason says which condition failed.
    """
    if not spec.weights_sha256:
        return False, f"{spec.name}: the registry records no sha256 of its weight file"
    if origin == "hub":
        if not (spec.revision and spec.revision_pinned):
            return False, f"{spec.name}: the registry pins no revision"
        if resolved_revision != spec.revision:
            return False, f"{spec.name}: weights served at {resolved_revision}, the pinned revision is {spec.revision}"
    elif not origin.startswith("override:"):
        return False, f"{spec.name}: weights origin {origin or 'unknown'!r} is neither the Hub nor a local file"
    want = "sha256:" + spec.weights_sha256.lower()
    if not any(str(d).lower().startswith(want) for d in files.values()):
        return False, f"{spec.name}: no weight file read has the registry's sha256 {spec.weights_sha256[:12]}..."
    return True, f"{spec.name}: pinned at {spec.revision}, weight file sha256 verified"


def weights_dir(weights: str | Path | None) -> Path | None:
    """Normalise a ``weights`` override to a Path, checking that it exists."""
    if weights is None:
        return None
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"weights override {path} does not exist")
    return path
