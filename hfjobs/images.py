"""The job images: a PyTorch CUDA runtime image for GPU flavors, a slim uv image for CPU flavors.

The GPU image carries torch at the version ``constraints.txt`` pins, so the launcher installs only the kit and
what the image lacks (it creates its venv with ``--system-site-packages``). An image is pinned by digest when
the table has a verified one; an entry whose digest could not be read from the registry says so
(``digest=None``, ``verified=False``) and the kit warns on every submit, naming ``--image NAME@sha256:...``
as the way to pin it. Where each entry came from is in ``source``.

What is checked offline, and what is not: an image reference's digest must have the form ``sha256:<64 lowercase
hex>`` (:func:`check_image_ref`, at parse time, exit 2 otherwise); the job records the reference it was
launched with (``COVTOKEN_IMAGE``, set by ``covtoken submit``) beside the one the Hub reports, and the audit and
``covtoken fetch`` check both against the submitted spec. Whether a digest *exists* is checked only by the
registry when the Hub pulls the image (a wrong one fails the job before it starts); the kit cannot check it
offline, and no digest in the table below was invented to look verified.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import HFJobsError

__all__ = ["ImageEntry", "IMAGES", "image_for", "image_ref", "digest_of", "is_gpu_flavor", "image_warning",
           "check_image_ref", "is_digest", "ImageRefError"]


@dataclass(frozen=True)
class ImageEntry:
    """One row of the image table."""

    name: str             # repository:tag
    digest: str | None    # sha256:<64 hex> read from the registry, or None when it could not be
    torch: str | None     # torch version inside the image (None: not installed, the launcher installs it)
    python: str
    as_of: str            # when the row was written
    source: str           # where the name, versions and digest come from
    verified: bool        # digest read from the registry (False: tag only)


#: kind -> entry. Written 2026-12-02 on a machine that reaches PyPI only: no registry could be queried, so no
#: digest is verified. The tags follow the naming of the images' publishers (pytorch/pytorch on Docker Hub:
#: ``<torch>-cuda<X.Y>-cudnn9-runtime``; astral-sh/uv on ghcr.io: ``python<X.Y>-bookworm-slim``); the torch
#: version is the one constraints.txt pins (a test keeps them equal). Fill ``digest`` with
#: ``docker buildx imagetools inspect NAME`` (or ``crane digest NAME``) and set ``verified=True``.
IMAGES: dict[str, ImageEntry] = {
    "gpu": ImageEntry(name="pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime", digest=None, torch="2.14.1",
                      python="3.11", as_of="2026-12-02",
                      source="tag pattern of pytorch/pytorch on Docker Hub; torch pin of constraints.txt; "
                             "digest not read (no registry access when written)", verified=False),
    "cpu": ImageEntry(name="ghcr.io/astral-sh/uv:python3.11-bookworm-slim", digest=None, torch=None,
                      python="3.11", as_of="2026-12-02",
                      source="tag pattern of astral-sh/uv on ghcr.io; digest not read (no registry access when "
                             "written)", verified=False),
}
_DIGEST = re.compile(r"@(sha256:[0-9a-f]{64})$")
_DIGEST_ONLY = re.compile(r"sha256:[0-9a-f]{64}")


class ImageRefError(HFJobsError):
    """An image reference whose digest part is malformed; the message names the flag and the value."""


def is_digest(text: str | None) -> bool:
    """``sha256:`` followed by exactly 64 lowercase hex digits."""
    return bool(text) and _DIGEST_ONLY.fullmatch(str(text)) is not None


def check_image_ref(image: str, flag: str = "--image") -> str:
    """``image`` when it is a usable reference: non-empty, no whitespace, and any ``@digest`` part of the form
    ``sha256:<64 lowercase hex>``; raises :class:`ImageRefError` otherwise. The digest's existence is the
    registry's to check when the Hub pulls the image."""
    if not image or any(c.isspace() for c in image):
        raise ImageRefError(f"{flag} {image!r}: expected an image reference such as repo/name:tag or "
                            "repo/name@sha256:<64 hex>")
    if "@" in image:
        name, _, digest = image.rpartition("@")
        if not name or not is_digest(digest):
            raise ImageRefError(f"{flag} {image}: the digest after '@' must be sha256:<64 lowercase hex digits>, "
                                f"got {digest!r} (read it with `docker buildx imagetools inspect {name or 'NAME'}`)")
    return image


def is_gpu_flavor(flavor: str) -> bool:
    """Every flavor but ``cpu-*`` has an accelerator."""
    return not flavor.startswith("cpu-")


def image_for(flavor: str) -> ImageEntry:
    """The table's image for a flavor."""
    return IMAGES["gpu" if is_gpu_flavor(flavor) else "cpu"]


def image_ref(entry: ImageEntry) -> str:
    """``name@digest`` when the digest is verified, else the tag."""
    if entry.verified and entry.digest:
        return f"{entry.name.rsplit(':', 1)[0]}@{entry.digest}"
    return entry.name


def digest_of(image: str) -> str | None:
    """The ``sha256:...`` an image reference is pinned to, or None (pinned by tag only)."""
    m = _DIGEST.search(image)
    return m.group(1) if m else None


def image_warning(image: str) -> str | None:
    """A warning when ``image`` is not pinned by digest (a tag can move under the run)."""
    if digest_of(image):
        return None
    entry = next((e for e in IMAGES.values() if e.name == image), None)
    why = (f"the kit's image table has no verified digest for it ({entry.source})" if entry
           else "it is pinned by tag only")
    return (f"image {image}: not pinned by digest: {why}; pin it with --image {image.rsplit(':', 1)[0]}"
            "@sha256:<digest>")
