"""Token banks: patch tokens per (dataset, backbone, block), stored in shards and resumable.

Layout of a bank folder::

    manifest.json              backbone provenance, blocks, grid, image/patient ids, finished shards + sha256
    shard-00000/block-03.npy   (n_images_in_shard, N, d) tokens of block 3
    ...

A shard is written file by file through temporary names and only then entered in the manifest, so an
interrupted build loses at most the shard in progress; calling :meth:`TokenBank.build` again verifies the
finished shards by hash and continues. Labels never enter a bank: per-token lesion fractions are kept
apart by the evaluation code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..data.layout import ImageItem
from ..record import loads_strict, sha256_file, write_json_atomic
from .frozen import FrozenBackbone

__all__ = ["TokenBank", "BankMismatchError"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class BankMismatchError(ValueError):
    """An existing bank folder was built for other inputs; it is never silently reused."""


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class TokenBank:
    """A finished or partially built bank in ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        self.manifest = loads_strict(path.read_text(), source=str(path))

    # ------------------------------------------------------------------ build
    @staticmethod
    def folder_for(work_dir: str | Path, *, dataset: str, revision: str, backbone: FrozenBackbone,
                   items: Sequence[ImageItem], blocks: Sequence[int], final_norm: bool) -> Path:
        """A bank folder name unique to its inputs (dataset, revision, backbone weights, images, blocks, norm)."""
        key = hashlib.sha256(json.dumps({"ids": _ids_digest([it.image_id for it in items]),
                                         "blocks": sorted(set(int(b) for b in blocks)), "final_norm": bool(final_norm),
                                         "weights": backbone.weights_digest}, sort_keys=True).encode()).hexdigest()[:12]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}-{revision}")[:80]
        return Path(work_dir) / "banks" / f"{safe}-{backbone.spec.name}-{key}"

    @classmethod
    def build(cls, root: str | Path, backbone: FrozenBackbone, items: Sequence[ImageItem], *, blocks: Sequence[int],
              final_norm: bool = False, shard_size: int = 64, batch_size: int = 16, dtype: str = "float32",
              on_shard: Callable[[Path], None] | None = None) -> "TokenBank":
        """Extract (or resume extracting) tokens of ``items`` for ``blocks``.

        Args:
            root: bank folder (created; reused only if built for exactly these inputs).
            backbone: frozen backbone.
            items: images in bank order.
            blocks: 0-based block indices.
            final_norm: apply the final norm to block outputs.
            shard_size: images per shard.
            batch_size: images per forward pass.
            dtype: ``"float32"`` or ``"float16"`` storage.
            on_shard: called with each finished shard folder (the HF backend uploads it).
        """
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        blocks = sorted(set(int(b) for b in blocks))
        ids = [it.image_id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("image ids in a token bank must be unique")
        identity = {
            "backbone": backbone.spec.name,
            "weights_digest": backbone.weights_digest,
            "blocks": blocks,
            "final_norm": bool(final_norm),
            "image_ids_sha256": _ids_digest(ids),
            "shard_size": int(shard_size),
            "dtype": dtype,
        }
        mpath = root / MANIFEST
        if mpath.exists():
            manifest = loads_strict(mpath.read_text(), source=str(mpath))
            if manifest["identity"] != identity:
                diff = sorted(k for k in identity if manifest["identity"].get(k) != identity[k])
                raise BankMismatchError(f"{mpath}: bank was built for other inputs (differs in {diff}); "
                                        "use another folder")
        else:
            manifest = {"identity": identity, "backbone": backbone.provenance(blocks=blocks, final_norm=final_norm),
                        "grid": list(backbone.grid), "image_ids": ids, "patient_ids": [it.patient_id for it in items],
                        "shards": {}, "complete": False}
            write_json_atomic(mpath, manifest, overwrite=True)
        n_shards = (len(items) + shard_size - 1) // shard_size
        for s in range(n_shards):
            key = f"{s:05d}"
            sdir = root / f"shard-{key}"
            done = manifest["shards"].get(key)
            if done and all((sdir / f).is_file() and sha256_file(sdir / f) == h for f, h in done["files"].items()):
                continue
            if done:
                log.warning("shard %s failed verification; rebuilding it", sdir)
            sdir.mkdir(exist_ok=True)
            start, stop = s * shard_size, min((s + 1) * shard_size, len(items))
            per_block: dict[int, list[np.ndarray]] = {b: [] for b in blocks}
            for b0 in range(start, stop, batch_size):
                batch = items[b0:min(b0 + batch_size, stop)]
                pixels = backbone.preprocess([it.image for it in batch])
                toks = backbone.patch_tokens(pixels, blocks, final_norm=final_norm)
                for b in blocks:
                    per_block[b].append(toks[b].numpy().astype(dtype))
            files = {}
            for b in blocks:
                f = sdir / f"block-{b:02d}.npy"
                _save_npy_atomic(f, np.concatenate(per_block[b]))
                files[f.name] = sha256_file(f)
            manifest["shards"][key] = {"start": start, "stop": stop, "files": files}
            write_json_atomic(mpath, manifest, overwrite=True)
            log.info(json.dumps({"event": "shard_done", "bank": str(root), "shard": key, "images": stop - start}))
            if on_shard is not None:
                on_shard(sdir)
        manifest["complete"] = True
        write_json_atomic(mpath, manifest, overwrite=True)
        return cls(root)

    # ------------------------------------------------------------------ read
    @property
    def blocks(self) -> list[int]:
        return list(self.manifest["identity"]["blocks"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])  # type: ignore[return-value]

    @property
    def image_ids(self) -> list[str]:
        return list(self.manifest["image_ids"])

    @property
    def patient_ids(self) -> list[str]:
        return list(self.manifest["patient_ids"])

    def split_rows(self, splits: Mapping[str, Iterable[str]]) -> dict[str, np.ndarray]:
        """Bank rows (image indices) of each split: split name -> patient ids -> ``(n,)`` int64 rows, bank order."""
        out = {}
        for name, members in splits.items():
            members = set(members)
            out[name] = np.array([i for i, p in enumerate(self.patient_ids) if p in members], dtype=np.int64)
        return out

    def tokens(self, block: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Tokens of ``block`` for images ``rows`` (all by default): ``(n_rows, N, d)`` float32."""
        if not self.manifest["complete"]:
            raise RuntimeError(f"{self.root}: bank is incomplete; build it first")
        if block not in self.blocks:
            raise KeyError(f"block {block} not in bank {self.root} (has {self.blocks})")
        parts = [np.load(self.root / f"shard-{k}" / f"block-{block:02d}.npy", mmap_mode="r")
                 for k in sorted(self.manifest["shards"])]
        full = np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
        out = full if rows is None else full[np.asarray(rows)]
        return np.ascontiguousarray(out, dtype=np.float32)
