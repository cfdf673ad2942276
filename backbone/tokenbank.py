"""Token banks: patch tokens per (dataset, backbone, block), stored in shards and resumable.

Layout of a bank folder::

    manifest.json              backbone provenance, blocks, grid, image/patient ids, finished shards + sha256
    shard-00000/block-03.npy   (n_images_in_shard, N, d) tokens of block 3
    ...

A shard's files are written through temporary names and only then entered in the manifest, so an
interrupted build loses at most the shard in progress; calling :meth:`TokenBank.build` again verifies the
finished shards by hash and continues. Labels never enter a bank: per-token lesion fractions are kept
apart by the evaluation code.

Throughput: batches are computed concurrently on forward workers (:func:`forward_plan` splits the torch thread budget
between them), each preparing its pixels with the library transform, running the forward pass and casting the
tokens, while one writer appends each batch's tokens to the shard's files in bank order as soon as they are ready
(hashing the bytes on their way to disk), so that preprocessing, hashing and I/O overlap with compute and a finished
shard only needs a sync, a rename and the manifest. Tokens are stored in the bank dtype
(:data:`BANK_DTYPES`; a locked protocol parameter ``token_bank_dtype``, see :func:`bank_dtype`) straight from the
forward output (one cast, checked for overflow); readers always get float32. The files are byte for byte the
``np.save`` of each whole shard, whatever the batch size or schedule.
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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..data.layout import ImageItem
from ..record import loads_strict, sha256_file, write_json_atomic
from ..threads import torch_threads
from .frozen import FrozenBackbone, all_finite

__all__ = ["TokenBank", "BankMismatchError", "BANK_DTYPES", "DEFAULT_BANK_DTYPE", "bank_dtype", "ForwardPlan",
           "forward_plan"]

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


#: Most batches a bank computes at once (each worker holds one batch's activations).
MAX_FORWARD_WORKERS = 16


@dataclass(frozen=True)
class ForwardPlan:
    """How a bank schedules its forward passes: ``workers`` batches at once, each with ``threads`` intra-op threads."""

    workers: int
    threads: int


def forward_plan(threads: int = 0, *, device: str | torch.device = "cpu") -> ForwardPlan:
    """The bank's schedule for a budget of ``threads`` torch intra-op threads (0: the current count).

    On the CPU the budget is split into concurrent forward passes rather than spent inside one: each worker thread
    prepares, computes and checks a whole batch with an even share of the threads, one each up to
    :data:`MAX_FORWARD_WORKERS`. A batch's preprocessing, casting and checks then overlap other batches' forward
    passes instead of leaving the threads of one parallel forward waiting, and small models, whose single forward
    cannot keep several threads busy, use every core. On an accelerator two workers suffice (one batch is prepared
    and copied back while the other computes) and more would only hold more batches in device memory. The tokens
    do not depend on the schedule (tested bit for bit against one forward at a time with the whole budget).
    """
    n = int(threads) or torch.get_num_threads()
    if n < 1:
        raise ValueError(f"thread budget must be positive, got {n}")
    workers = min(n, MAX_FORWARD_WORKERS) if torch.device(device).type == "cpu" else 2
    return ForwardPlan(workers=workers, threads=max(1, n // workers))


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

        store = getattr(torch, dtype)

        def extract(b0: int, b1: int) -> dict[int, np.ndarray]:
            """Tokens of images ``b0..b1-1`` in the bank dtype, checked (runs on a forward worker)."""
            pixels = backbone.preprocess([it.image for it in items[b0:b1]])
            toks = backbone.patch_tokens(pixels, blocks, final_norm=final_norm)
            arrays = {}
            for b in blocks:
                out = toks[b].to(store).contiguous()
                if store is not torch.float32 and not all_finite(out):
                    raise OverflowError(f"{backbone.spec.name}: block {b} tokens overflow {dtype} "
                                        f"(images {b0}..{b1 - 1}); use token_bank_dtype float32")
                arrays[b] = out.numpy()
            return arrays

        from ..progress import progress

        plan = forward_plan(device=backbone.device)
        log.info(json.dumps({"event": "bank_plan", "bank": str(root), "batches": len(batches),
                             "forward_workers": plan.workers, "intra_op_threads": plan.threads}))
        try:
            with torch_threads(plan.threads), \
                    ThreadPoolExecutor(plan.workers, thread_name_prefix="bank-forward") as pool, \
                    ThreadPoolExecutor(1, thread_name_prefix="bank-write") as writer, \
                    progress(f"tokens {backbone.spec.name}", sum(b1 - b0 for _, b0, b1 in batches),
                             unit="images") as step:
                # at most workers + 1 batches of tokens in flight, and 2 waiting for the writer
                ahead = deque(pool.submit(extract, b0, b1) for _, b0, b1 in batches[:plan.workers + 1])
                unsubmitted = iter(batches[plan.workers + 1:])
                writes: list[Future] = []
                try:
                    for s, b0, b1 in batches:
                        arrays = ahead.popleft().result()
                        following = next(unsubmitted, None)  # keep the window full
                        if following is not None:
                            ahead.append(pool.submit(extract, *following[1:]))
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
