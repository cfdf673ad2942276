"""Probe job of the commit-count test (tests/test_hfjobs_sweep.py): makes ``--shards`` token-bank-like shards
through the real ``HubSync`` of its bundle, then one final file, the way a gate job uploads its bank and record.

It is a test fixture, not a gate: it judges nothing and writes no gate record.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from covtoken.hfjobs.hubsync import HubSync


def main(argv: list[str]) -> int:
    shards = int(argv[argv.index("--shards") + 1]) if "--shards" in argv else 4
    sync = HubSync.from_environment()
    bank = Path("bank") / "probe"
    bank.mkdir(parents=True, exist_ok=True)
    on_shard = sync.bank_uploader(bank)
    for i in range(shards):
        sdir = bank / f"shard-{i:05d}"
        sdir.mkdir(exist_ok=True)
        (sdir / "block-00.npy").write_bytes(bytes([i % 256]) * 1024)
        (bank / "manifest.json").write_text(json.dumps({"shards": {f"{j:05d}": {} for j in range(i + 1)}}))
        on_shard(sdir)
        time.sleep(0.05)
    done = Path("done.json")
    done.write_text(json.dumps({"shards": shards, "argv": argv}))
    sync.publish_file(done, "done.json")
    print(json.dumps({"event": "probe_done", "shards": shards, "batched_commits": sync.batcher.commits}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
