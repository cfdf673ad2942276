"""Token banks: patch tokens per (dataset, backbone, block), stored in shards and resumable.

Layout of a bank folder::

    manifest.json              backbone provenance, blocks, grid, image/patient ids, finished shards + sha256
    shard-00000/block-03.npy   (n_images_in_shard, N, d) tokens of block 3
    ...

A shard's files are written through temporary names and only then entered in the manifest, so an
interrupted build loses at most the shard in progress; calling :meth:`TokenBank.build` again verifies the
finished shards by hash and continues. Labels never enter a bank: per-token lesion fractions are kept
apart by the evaluation code.

Throughput: the forward pass runs on the calling thread while workers prepare the next batches of pixels (the
library transform) and one writer appends each batch's tokens to the shard's files as soon as it is computed
(hashing the bytes on their way to disk and syncing them), so that preprocessing, hashing and I/O overlap with
compute and a finished shard only needs a rename and the manifest. Tokens are stored in the bank dtype
(:data:`BANK_DTYPES`; a locked protocol parameter ``token_bank_dtype``, see :func:`bank_dtype`) straight from the
forward output (one cast, checked for overflow); readers always get float32. The files are byte for byte the
``np.save`` of each whole shard, whatever the batch size.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..data.layout import ImageItem
from ..record import loads_strict, sha256_file, write_json_atomic
from .frozen import FrozenBackbone, all_finite

__all__ = ["TokenBank", "BankMismatchError", "BANK_DTYPES", "DEFAULT_BANK_DTYPE", "bank_dtype"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
#: Storage dtypes a bank may use. float16 halves the bytes (ViT-B: ~3.5 MB instead of ~7 MB per image, all blocks).
BANK_DTYPES = ("float32", "float16")
#: The dtype every lock entry that does not name ``token_bank_dtype`` was calibrated and judged with.
DEFAULT_BANK_DTYPE = "float32"


def bank_dtype(params: Mapping[str, Any]) -> str:
    """The token-bank storage dtype of a lock entry's protocol parameters (``token_bank_dtype``).

    Entries locked before the parameter existed ran with float32 banks and keep them; a new or superseding entry
    names its dtype. Any other value is an error.
    """
    value = params.get("token_bank_dtype", DEFAULT_BANK_DTYPE)
    if value not in BANK_DTYPES:
        raise ValueError(f"token_bank_dtype must be one of {list(BANK_DTYPES)}, got {value!r}")
    return str(value)


class BankMismatchError(ValueError):
    """An existing bank folder was built for other inputs; it is never silently reused."""


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


class _ShardFiles:
    """The ``.npy`` files of one shard while it is extracted, one per block, written batch by batch.

    Each file gets the ``.npy`` header of its final shape first (the header ``np.save`` writes), then the rows of
    every batch as they arrive; the bytes are hashed on their way to disk. The files are synced once, when the shard
    is finished: a shard counts only once the manifest lists it, so syncing each batch would buy no safety (a killed
    build's temporary files are discarded) and cost one disk round trip per batch and block. Files live under
    temporary names until :meth:`finish` renames them; :meth:`abort` removes them. The result is byte for byte the ``np.save`` of the whole shard.
    """

    def __init__(self, sdir: Path, blocks: Sequence[int], shape: tuple[int, int, int], dtype: str) -> None:
        self.sdir, self.rows, self.expected = sdir, 0, shape[0]
        self.tmp: dict[int, str] = {}
        self.fh: dict[int, Any] = {}
        self.sha = {b: hashlib.sha256() for b in blocks}
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": tuple(shape)})
        try:
            for b in blocks:
                fd, self.tmp[b] = tempfile.mkstemp(prefix=f".block-{b:02d}.npy.", dir=sdir)
                self.fh[b] = os.fdopen(fd, "wb")
                self._write(b, header.getvalue())
        except BaseException:
            self.abort()
            raise

    def _write(self, b: int, data: bytes | memoryview) -> None:
        self.sha[b].update(data)
        with _naming(self.sdir / f"block-{b:02d}.npy"):
            self._put(b, data)

    def _put(self, b: int, data: bytes | memoryview) -> None:
        """The one place a shard's bytes reach the disk (tests plant a full disk here)."""
        self.fh[b].write(data)

    def append(self, arrays: Mapping[int, np.ndarray]) -> None:
        """Append one batch: ``{block: (k, N, d)}`` C-contiguous arrays in the bank dtype."""
        ks = {a.shape[0] for a in arrays.values()}
        if set(arrays) != set(self.fh) or len(ks) != 1 or self.rows + ks.pop() > self.expected:
            raise RuntimeError(f"{self.sdir}: batch does not fit the shard being written")
        for b, a in arrays.items():
            self._write(b, memoryview(np.ascontiguousarray(a)).cast("B"))
        self.rows += next(iter(arrays.values())).shape[0]

    def finish(self) -> dict[str, str]:
        """Sync, close and rename every file; returns file name -> sha256 of its bytes."""
        if self.rows != self.expected:
            raise RuntimeError(f"{self.sdir}: shard has {self.rows} of {self.expected} rows")
        files = {}
        for b, fh in self.fh.items():
            with _naming(self.sdir / f"block-{b:02d}.npy"):
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        for b, tmp in self.tmp.items():
            name = f"block-{b:02d}.npy"
            os.replace(tmp, self.sdir / name)
            files[name] = self.sha[b].hexdigest()
        self.tmp.clear()
        return files

    def abort(self) -> None:
        """Close and remove the temporary files (an interrupted or failed shard leaves nothing behind)."""
        for fh in self.fh.values():
            try:
                fh.close()
            except OSError:
                pass
        for tmp in self.tmp.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.tmp.clear()


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An ``OSError`` that does not name its file (a full disk reports bytes, not paths) is re-raised naming
    ``path``, so the user's one-line error says which shard file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None and exc.errno != errno.ENOSPC:
            raise
        raise OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path)) from None


def _preprocess_digest(backbone: FrozenBackbone) -> str:
    """sha256 of the resolved library transform: a bank built with other preprocessing is never reused."""
    return hashlib.sha256(json.dumps(backbone.transform.provenance(), sort_keys=True).encode()).hexdigest()


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
                                         "weights": backbone.weights_digest, "preprocess": _preprocess_digest(backbone)},
                                        sort_keys=True).encode()).hexdigest()[:12]
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
            dtype: storage dtype, one of :data:`BANK_DTYPES` (jobs pass :func:`bank_dtype` of the locked parameters).
            on_shard: called with each finished shard folder (the HF backend uploads it).
        """
        if dtype not in BANK_DTYPES:
            raise ValueError(f"token bank dtype must be one of {list(BANK_DTYPES)}, got {dtype!r}")
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
            "preprocess_sha256": _preprocess_digest(backbone),
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
        todo = []
        for s in range(n_shards):
            key = f"{s:05d}"
            sdir = root / f"shard-{key}"
            done = manifest["shards"].get(key)
            if done and all((sdir / f).is_file() and sha256_file(sdir / f) == h for f, h in done["files"].items()):
                continue
            if done:
                log.warning("shard %s failed verification; rebuilding it", sdir)
            todo.append(s)
        batches = [(s, b0, min(b0 + batch_size, (s + 1) * shard_size, len(items)))
                   for s in todo for b0 in range(s * shard_size, min((s + 1) * shard_size, len(items)), batch_size)]
        n, d = backbone.grid[0] * backbone.grid[1], backbone.spec.width

        failed: list[BaseException] = []
        open_shard: dict[str, _ShardFiles | None] = {"files": None}  # owned by the writer thread
        fresh: dict[str, bool] = {}  # shard key -> its folder was created by this build

        def consume(s: int, b0: int, b1: int, arrays: dict[int, np.ndarray]) -> None:
            if failed:  # an earlier batch's write or on_shard failed (or the build stopped): write nothing after it
                return
            try:
                _consume(s, b0, b1, arrays)
            except BaseException as err:
                failed.append(err)
                raise

        def _consume(s: int, b0: int, b1: int, arrays: dict[int, np.ndarray]) -> None:
            key = f"{s:05d}"
            sdir = root / f"shard-{key}"
            start, stop = s * shard_size, min((s + 1) * shard_size, len(items))
            if b0 == start:
                fresh[key] = not sdir.exists()
                sdir.mkdir(exist_ok=True)
                for stale in sdir.glob(".block-*.npy.*"):  # temporary files of a build that was killed
                    stale.unlink()
                open_shard["files"] = _ShardFiles(sdir, blocks, (stop - start, n, d), dtype)
            shard = open_shard["files"]
            assert shard is not None
            shard.append(arrays)
            if b1 < stop:
                return
            files = shard.finish()
            open_shard["files"] = None
            manifest["shards"][key] = {"start": start, "stop": stop, "files": files}
            try:
                write_json_atomic(mpath, manifest, overwrite=True)
            except BaseException:  # not listed on disk, so not part of the bank: leave none of it behind
                manifest["shards"].pop(key, None)
                if fresh.get(key):
                    shutil.rmtree(sdir, ignore_errors=True)
                raise
            log.info(json.dumps({"event": "shard_done", "bank": str(root), "shard": key, "images": stop - start}))
            if on_shard is not None:
                on_shard(sdir)

        def prepare(b0: int, b1: int) -> Any:
            return backbone.preprocess([it.image for it in items[b0:b1]])

        from ..progress import progress

        store = getattr(torch, dtype)
        # Batches are prepared ahead on threads (PIL transforms release the GIL), except one case: a batch the
        # library converts in one vectorised call (images already at the input size) while torch runs several
        # intra-op threads. Its torch ops would then start a second OpenMP team that stalls the forward's (measured
        # on two cores: 0.48-0.54x of the bare forward on a thread, 0.65-0.70x inline); it is cheap, so inline.
        inline = torch.get_num_threads() > 1 and backbone.transform.takes_batch_path([it.image for it in items])
        workers = max(1, min(4, (os.cpu_count() or 2) // 2))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="bank-prep") as prep, \
                    ThreadPoolExecutor(1, thread_name_prefix="bank-write") as writer, \
                    progress(f"tokens {backbone.spec.name}", sum(b1 - b0 for _, b0, b1 in batches),
                             unit="images") as step:
                writes: list[Future] = []
                ahead = [] if inline else [prep.submit(prepare, b0, b1) for _, b0, b1 in batches[:workers + 1]]
                try:
                    for i, (s, b0, b1) in enumerate(batches):
                        pixels = prepare(b0, b1) if inline else ahead.pop(0).result()
                        if not inline and i + len(ahead) + 1 < len(batches):
                            ahead.append(prep.submit(prepare, *batches[i + len(ahead) + 1][1:]))
                        toks = backbone.patch_tokens(pixels, blocks, final_norm=final_norm)
                        arrays = {}
                        for b in blocks:
                            out = toks[b].to(store).contiguous()
                            if store is not torch.float32 and not all_finite(out):
                                raise OverflowError(f"{backbone.spec.name}: block {b} tokens overflow {dtype} "
                                                    f"(images {b0}..{b1 - 1}); use token_bank_dtype float32")
                            arrays[b] = out.numpy()
                        step(b1 - b0)
                        while writes and (writes[0].done() or len(writes) >= 2):  # surface errors; at most 2 queued
                            writes.pop(0).result()
                        writes.append(writer.submit(consume, s, b0, b1, arrays))
                    for w in writes:
                        w.result()
                except BaseException as err:
                    failed.append(err)  # queued writes return at once
                    for f in ahead:
                        f.cancel()
                    raise
        finally:
            if open_shard["files"] is not None:  # the writer has stopped: remove the unfinished shard's files
                unfinished = open_shard["files"]
                unfinished.abort()
                key = unfinished.sdir.name.removeprefix("shard-")
                if fresh.get(key) and key not in manifest["shards"]:  # a shard the manifest does not list is not
                    shutil.rmtree(unfinished.sdir, ignore_errors=True)  # part of the bank: leave no folder of it
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
