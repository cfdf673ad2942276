"""Token bank: storage dtype as a protocol parameter, hashes computed while writing, preprocessing in the identity."""
from __future__ import annotations

import dataclasses
import io
import threading
import time

import numpy as np
import pytest
import torch

from covtoken.backbone.frozen import load_backbone
from covtoken.backbone import tokenbank
from covtoken.backbone.tokenbank import BankMismatchError, ForwardPlan, TokenBank, bank_dtype, forward_plan
from covtoken.data.catalog import load_dataset
from covtoken.record import sha256_file
from covtoken.threads import torch_threads


@pytest.fixture(scope="module")
def small():
    return load_backbone("tiny-vit"), load_dataset("phantom-ct", seed=0, n_patients=2, per_patient=3).items


def test_bank_dtype_reads_the_locked_parameter() -> None:
    assert bank_dtype({}) == "float32"  # entries locked before the parameter existed ran with float32 banks
    assert bank_dtype({"token_bank_dtype": "float16"}) == "float16"
    with pytest.raises(ValueError, match="token_bank_dtype"):
        bank_dtype({"token_bank_dtype": "bfloat16"})


def test_float16_bank_stores_half_the_bytes_and_the_rounded_tokens(tmp_path, small) -> None:
    bb, items = small
    f32 = TokenBank.build(tmp_path / "a", bb, items, blocks=[2, 5], shard_size=4)
    f16 = TokenBank.build(tmp_path / "b", bb, items, blocks=[2, 5], shard_size=4, dtype="float16")
    a = np.load(tmp_path / "a" / "shard-00000" / "block-05.npy")
    b = np.load(tmp_path / "b" / "shard-00000" / "block-05.npy")
    assert a.dtype == np.float32 and b.dtype == np.float16 and b.nbytes * 2 == a.nbytes
    np.testing.assert_array_equal(f16.tokens(5), f32.tokens(5).astype(np.float16).astype(np.float32))
    assert f16.tokens(5).dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        TokenBank.build(tmp_path / "c", bb, items, blocks=[2], dtype="int8")


def test_hashes_written_with_the_file_equal_the_file_hash(tmp_path, small) -> None:
    bb, items = small
    bank = TokenBank.build(tmp_path / "a", bb, items, blocks=[0, 3], shard_size=4, batch_size=3)
    assert len(bank.manifest["shards"]) == 2
    for key, shard in bank.manifest["shards"].items():
        for name, digest in shard["files"].items():
            assert sha256_file(tmp_path / "a" / f"shard-{key}" / name) == digest
    # batches that straddle shard boundaries give the same tokens as one image at a time
    one = TokenBank.build(tmp_path / "b", bb, items, blocks=[0, 3], shard_size=4, batch_size=1)
    np.testing.assert_array_equal(one.tokens(3), bank.tokens(3))
    direct = bb.patch_tokens(bb.preprocess([it.image for it in items]), [3])[3].numpy()
    np.testing.assert_allclose(bank.tokens(3), direct, atol=1e-5, rtol=0)


def test_other_preprocessing_is_another_bank(tmp_path, small) -> None:
    bb, items = small
    TokenBank.build(tmp_path / "a", bb, items, blocks=[1], shard_size=4)
    other = load_backbone("tiny-vit")
    other._transform = dataclasses.replace(other.transform, resolved={**other.transform.resolved, "interpolation": "x"})
    with pytest.raises(BankMismatchError, match="preprocess"):
        TokenBank.build(tmp_path / "a", other, items, blocks=[1], shard_size=4)
    assert TokenBank.folder_for(tmp_path, dataset="d", revision="r", backbone=bb, items=items, blocks=[1],
                                final_norm=False) != TokenBank.folder_for(tmp_path, dataset="d", revision="r",
                                                                          backbone=other, items=items, blocks=[1],
                                                                          final_norm=False)


def test_float16_overflow_fails_instead_of_storing_inf(tmp_path, small, monkeypatch) -> None:
    bb, items = small
    real = bb.patch_tokens

    def huge(pixels, blocks, *, final_norm=False):
        return {b: t * 1e6 for b, t in real(pixels, blocks, final_norm=final_norm).items()}

    monkeypatch.setattr(bb, "patch_tokens", huge)
    with pytest.raises(OverflowError, match="float16"):
        TokenBank.build(tmp_path / "a", bb, items, blocks=[1], shard_size=4, dtype="float16")
    assert torch.isfinite(real(bb.preprocess([items[0].image]), [1])[1]).all()


def test_batchwise_files_are_np_save_bytes_and_a_failed_build_leaves_only_finished_shards(tmp_path, small,
                                                                                          monkeypatch) -> None:
    bb, items = small  # 6 images: shard 0 = images 0..3, shard 1 = images 4..5
    ref = TokenBank.build(tmp_path / "ref", bb, items, blocks=[1, 4], shard_size=4, batch_size=4, dtype="float16")
    for key in ref.manifest["shards"]:
        f = tmp_path / "ref" / f"shard-{key}" / "block-04.npy"
        buf = io.BytesIO()
        np.save(buf, np.load(f))
        assert f.read_bytes() == buf.getvalue()  # the header and layout np.save writes
    real, last = bb.patch_tokens, bb.preprocess([items[5].image])

    def fails_on_the_last(pixels, blocks, *, final_norm=False):
        # image 5 is the second batch of shard 1: fail once the writer has shard 1's files open and half written
        # (batches run concurrently, so the failing call is found by its pixels, not by its place in the calls)
        if torch.equal(pixels, last):
            deadline = time.monotonic() + 30
            while not list((tmp_path / "b" / "shard-00001").glob(".block-*")) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert list((tmp_path / "b" / "shard-00001").glob(".block-*")), "the writer never opened shard 1"
            raise RuntimeError("planted failure")
        return real(pixels, blocks, final_norm=final_norm)

    monkeypatch.setattr(bb, "patch_tokens", fails_on_the_last)
    budget = torch.get_num_threads() + 1
    with torch_threads(budget):
        with pytest.raises(RuntimeError, match="planted"):
            TokenBank.build(tmp_path / "b", bb, items, blocks=[1, 4], shard_size=4, batch_size=1, dtype="float16")
        assert torch.get_num_threads() == budget  # the build's share per worker is undone on failure too
    assert sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()) == [
        "manifest.json", "shard-00000/block-01.npy", "shard-00000/block-04.npy"]
    assert list(TokenBank(tmp_path / "b").manifest["shards"]) == ["00000"]
    monkeypatch.setattr(bb, "patch_tokens", real)
    resumed = TokenBank.build(tmp_path / "b", bb, items, blocks=[1, 4], shard_size=4, batch_size=1, dtype="float16")
    assert resumed.manifest["shards"] == ref.manifest["shards"]  # same bytes whatever the batch size or interruption


def test_forward_plan_splits_the_thread_budget_into_concurrent_forwards() -> None:
    assert forward_plan(1) == ForwardPlan(workers=1, threads=1)
    assert forward_plan(2) == ForwardPlan(workers=2, threads=1)
    assert forward_plan(40) == ForwardPlan(workers=tokenbank.MAX_FORWARD_WORKERS, threads=40 // 16)
    with torch_threads(3):
        assert forward_plan() == ForwardPlan(workers=3, threads=1)  # 0: the current count
    with pytest.raises(ValueError, match="positive"):
        forward_plan(-1)
    # on an accelerator: one batch computing while the next is prepared, whatever the CPU budget
    assert forward_plan(1, device="cuda") == ForwardPlan(workers=2, threads=1)
    assert forward_plan(16, device="cuda:0") == ForwardPlan(workers=2, threads=8)


@pytest.mark.parametrize("budget", [1, 2, 4])
def test_tokens_do_not_depend_on_the_schedule(tmp_path, small, budget) -> None:
    """Batches computed concurrently with a share of the threads give, bit for bit, the tokens of one forward at a
    time with the whole budget, in bank order; the thread count is the budget again after the build."""
    bb, items = small  # 6 images, 6 batches of one
    blocks = [0, 3, 5]
    with torch_threads(budget):
        bank = TokenBank.build(tmp_path / "bank", bb, items, blocks=blocks, shard_size=4, batch_size=1)
        assert torch.get_num_threads() == budget
        one_at_a_time = [bb.patch_tokens(bb.preprocess([it.image]), blocks) for it in items]
    for b in blocks:
        np.testing.assert_array_equal(bank.tokens(b), torch.cat([t[b] for t in one_at_a_time]).numpy())


def test_forward_workers_run_with_their_share_of_the_threads(tmp_path, small, monkeypatch) -> None:
    bb, items = small
    real, seen = bb.patch_tokens, []
    lock = threading.Lock()

    def recording(pixels, blocks, *, final_norm=False):
        with lock:
            seen.append((threading.current_thread().name.split("_")[0], torch.get_num_threads()))
        return real(pixels, blocks, final_norm=final_norm)

    monkeypatch.setattr(bb, "patch_tokens", recording)
    monkeypatch.setattr(tokenbank, "MAX_FORWARD_WORKERS", 2)
    with torch_threads(4):  # 2 workers x 2 threads
        TokenBank.build(tmp_path / "bank", bb, items, blocks=[1], shard_size=4, batch_size=1)
    assert seen == [("bank-forward", 2)] * len(items)
