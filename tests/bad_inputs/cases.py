"""The bad-input corpus: every case must exit 2 with exactly one line on stderr that names the culprit, without
a traceback, and leave no record or temporary file behind (tests/test_bad_inputs.py runs them in-process).

A case is ``Case(id, target, args, culprit, setup=None, fault=None)``:
- ``target``: ``"job"`` (jobs/g1_lesion_subspace.py's main, with --results/--work-dir/--lock of the case's folder
  appended unless the case sets them), ``"cli"`` (covtoken's main) or ``"materialize"``
  (jobs/materialize_dataset.py's main);
- ``args``: argv; ``{tmp}`` is replaced by the case's folder, ``{lock}`` by a good copy of the lock;
- ``culprit``: text the error line must contain (the flag, key, file or row), ``{tmp}`` replaced as above;
- ``setup(tmp)``: writes the bad files; ``fault(monkeypatch, tmp)``: plants a disk or permission fault.
A new case is one more row.
"""
from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Case:
    id: str
    target: str
    args: tuple[str, ...]
    culprit: str
    setup: Callable[[Path], None] | None = None
    fault: Callable[..., None] | None = None


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return setup


def _lock_edit(tmp: Path) -> None:  # a lock edited by hand: a threshold changed, digests left alone
    from conftest import REPO_ROOT

    doc = json.loads((REPO_ROOT / "configs" / "thresholds.lock.json").read_text())
    doc["gates"]["G1"]["entries"]["embedded"]["criteria"][0]["threshold"] = -1.0
    (tmp / "edited.lock.json").write_text(json.dumps(doc))


def _busi(tmp: Path, *, index: str | None = None, image: bytes | None = None, mask: bytes | None = None,
          drop_mask: bool = False) -> None:
    """A copy of the two first BUSI sample rows, then one thing broken."""
    from conftest import REALDATA

    src = REALDATA / "busi"
    root = tmp / "busi"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = (src / "index.csv").read_text().splitlines()[:3]
    for line in lines[1:]:
        img, msk = line.split(",")[:2]
        shutil.copy(src / img, root / img)
        shutil.copy(src / msk, root / msk)
    (root / "index.csv").write_text(index if index is not None else "\n".join(lines) + "\n")
    first_img, first_mask = lines[1].split(",")[:2]
    if image is not None:
        (root / first_img).write_bytes(image)
    if mask is not None:
        (root / first_mask).write_bytes(mask)
    if drop_mask:
        (root / first_mask).unlink()


def _kits_seg_only(tmp: Path) -> None:
    case = tmp / "kits" / "case_00001"
    case.mkdir(parents=True)
    (case / "segmentation.nii.gz").write_bytes(b"\x1f\x8b not really")


def _kits_corrupt(tmp: Path) -> None:
    case = tmp / "kits" / "case_00001"
    case.mkdir(parents=True)
    (case / "imaging.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    (case / "segmentation.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")


def _ham(tmp: Path, header: str, rows: list[str]) -> None:
    root = tmp / "ham"
    (root / "images").mkdir(parents=True)
    (root / "HAM10000_metadata.csv").write_text("\n".join([header, *rows]) + "\n")


def _enospc_on_write(monkeypatch, tmp: Path) -> None:  # noqa: ANN001 - a full disk under every atomic JSON write
    import os

    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setattr("covtoken.record.os.fsync", full, raising=False)
    del real


def _enospc_in_shard_write(monkeypatch, tmp: Path) -> None:  # noqa: ANN001 - the disk fills while a shard is written
    from covtoken.backbone import tokenbank

    real = tokenbank._ShardFiles._put

    def put(self, b: int, data) -> None:  # noqa: ANN001
        if len(data) > 4096:  # the header goes through, the first batch's rows do not (as numpy reports it)
            real(self, b, bytes(data)[:1024])
            raise OSError(errno.ENOSPC, f"{len(data)} requested and 1024 written")
        real(self, b, data)

    monkeypatch.setattr(tokenbank._ShardFiles, "_put", put)


def _deny_read(name: str) -> Callable[..., None]:
    def fault(monkeypatch, tmp: Path) -> None:  # noqa: ANN001 - root ignores chmod; deny by the path instead
        import pathlib

        target = str(tmp / name)
        real = pathlib.Path.read_text

        def read_text(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            if str(self) == target:
                raise PermissionError(errno.EACCES, "Permission denied", target)
            return real(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    return fault


def _deny_mkdir(monkeypatch, tmp: Path) -> None:  # noqa: ANN001 - an unwritable results folder
    import pathlib

    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(self).startswith(str(tmp / "results")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


GOOD_CAL = {"kind": "covtoken.calibration_run", "entry": "G1/embedded", "run_id": "g1-cal", "metrics": {},
            "code": {"commit": "0" * 40}, "config": {"calibration": True, "seed": 0},
            "dataset": {"id": "phantom-ct", "revision": "generator-seed-1000",
                        "splits": {"role": "calibration", "patient_digests": {"train": ["ab"]}}}}


def _cal(**changes: object) -> Callable[[Path], None]:
    from covtoken.lock import gate_template

    doc = json.loads(json.dumps(GOOD_CAL))
    doc["metrics"] = {c["metric"]: {"value": 0.5, "ci": [0.4, 0.6]}
                      for c in gate_template("G1")["entries"]["embedded"]["criteria"]}
    for k, v in changes.items():
        cur = doc
        *head, last = k.split("/")
        for h in head:
            cur = cur[h]
        if v is None:
            cur.pop(last)
        else:
            cur[last] = v
    return _write("cal.json", json.dumps(doc))


CAL = ("thresholds", "calibrate", "--gate", "G1", "--entry", "embedded", "--out", "{tmp}/p.json")
J = "job"

CASES: list[Case] = [
    # ---- job flags, parsed and validated before any work
    Case("seed-not-int", J, ("--seed", "abc"), "--seed"),
    Case("seed-float", J, ("--seed", "1.5"), "--seed"),
    Case("seed-negative", J, ("--seed", "-1"), "--seed"),
    Case("batch-negative", J, ("--batch-size", "-4"), "--batch-size"),
    Case("batch-zero", J, ("--batch-size", "0"), "--batch-size"),
    Case("batch-word", J, ("--batch-size", "four"), "--batch-size"),
    Case("smoke-unknown-backbone", J, ("--smoke", "--backbone", "vit-huge-nonexistent"), "vit-huge-nonexistent"),
    Case("unknown-backbone", J, ("--backbone", "nope-vit"), "nope-vit"),
    Case("unknown-flag", J, ("--no-such-flag", "1"), "--no-such-flag"),
    Case("bool-with-value", J, ("--calibration=yes",), "--calibration"),
    Case("flag-without-value", J, ("--seed",), "--seed"),
    Case("unknown-dataset", J, ("--dataset", "no-such-dataset"), "no-such-dataset"),
    Case("busi-without-root", J, ("--dataset", "busi"), "--data-root"),
    Case("busi-root-missing", J, ("--dataset", "busi", "--data-root", "{tmp}/nowhere"), "{tmp}/nowhere"),
    Case("lidc-root-empty", J, ("--dataset", "lidc", "--data-root", "{tmp}/empty"), "{tmp}/empty",
         setup=lambda t: (t / "empty").mkdir()),
    Case("lock-missing", J, ("--lock", "{tmp}/no.lock.json"), "{tmp}/no.lock.json"),
    Case("lock-not-json", J, ("--lock", "{tmp}/bad.lock.json"), "{tmp}/bad.lock.json",
         setup=_write("bad.lock.json", "{not json")),
    Case("lock-edited", J, ("--lock", "{tmp}/edited.lock.json"), "edited.lock.json", setup=_lock_edit),
    Case("lock-entry-unknown", J, ("--lock-entry", "G1/nope"), "no entry 'nope'"),
    Case("lock-entry-other-gate", J, ("--lock-entry", "G2/embedded"), "G2/embedded"),
    # ---- config files
    Case("config-missing", J, ("--config", "{tmp}/none.json"), "{tmp}/none.json"),
    Case("config-folder", J, ("--config", "{tmp}"), "{tmp}"),
    Case("config-not-json", J, ("--config", "{tmp}/c.json"), "c.json", setup=_write("c.json", "seed = 1")),
    Case("config-list", J, ("--config", "{tmp}/c.json"), "c.json", setup=_write("c.json", "[1, 2]")),
    Case("config-seed-word", J, ("--config", "{tmp}/c.json"), "seed", setup=_write("c.json", '{"seed": "one"}')),
    Case("config-seed-float", J, ("--config", "{tmp}/c.json"), "seed", setup=_write("c.json", '{"seed": 1.5}')),
    Case("config-seed-bool", J, ("--config", "{tmp}/c.json"), "seed", setup=_write("c.json", '{"seed": true}')),
    Case("config-seed-nan", J, ("--config", "{tmp}/c.json"), "c.json", setup=_write("c.json", '{"seed": NaN}')),
    Case("config-batch-negative", J, ("--config", "{tmp}/c.json"), "--batch-size",
         setup=_write("c.json", '{"batch_size": -4}')),
    Case("config-unknown-key", J, ("--config", "{tmp}/c.json"), "sede", setup=_write("c.json", '{"sede": 1}')),
    Case("config-duplicate-key", J, ("--config", "{tmp}/c.json"), "c.json",
         setup=_write("c.json", '{"seed": 1, "seed": 2}')),
    Case("config-smoke-word", J, ("--config", "{tmp}/c.json"), "smoke", setup=_write("c.json", '{"smoke": "yes"}')),
    Case("config-backbone-unknown", J, ("--config", "{tmp}/c.json"), "vit-none",
         setup=_write("c.json", '{"backbone": "vit-none"}')),
    Case("config-constructions-number", J, ("--config", "{tmp}/c.json"), "constructions",
         setup=_write("c.json", '{"constructions": 5}')),
    Case("config-binary", J, ("--config", "{tmp}/c.json"), "c.json", setup=_write("c.json", b"\xff\xfe\x00garbage")),
    Case("config-unreadable", J, ("--config", "{tmp}/c.json"), "c.json", setup=_write("c.json", '{"seed": 1}'),
         fault=_deny_read("c.json")),
    # ---- data files
    Case("busi-corrupt-png", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "benign_1.png",
         setup=lambda t: _busi(t, image=b"\x89PNG\r\n\x1a\n broken")),
    Case("busi-corrupt-mask", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "benign_1_mask.png",
         setup=lambda t: _busi(t, mask=b"not a png")),
    Case("busi-missing-mask", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "benign_1_mask.png",
         setup=lambda t: _busi(t, drop_mask=True)),
    Case("busi-index-missing-column", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "index.csv",
         setup=lambda t: _busi(t, index="file,label\nimages/benign_1.png,benign\n")),
    Case("busi-index-empty", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "index.csv",
         setup=lambda t: _busi(t, index="file,mask\n")),
    Case("busi-index-wrong-size", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "benign_1",
         setup=lambda t: _busi(t, index="file,mask,h,w\nimages/benign_1.png,masks/benign_1_mask.png,10,10\n")),
    Case("busi-index-size-word", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "index.csv",
         setup=lambda t: _busi(t, index="file,mask,h,w\nimages/benign_1.png,masks/benign_1_mask.png,tall,wide\n")),
    Case("busi-index-unknown-file", J, ("--dataset", "busi", "--data-root", "{tmp}/busi"), "ghost.png",
         setup=lambda t: _busi(t, index="file,mask\nimages/ghost.png,masks/benign_1_mask.png\n")),
    Case("kits-seg-without-image", J, ("--dataset", "kits23", "--data-root", "{tmp}/kits"), "case_00001",
         setup=_kits_seg_only),
    Case("kits-corrupt-nifti", J, ("--dataset", "kits23", "--data-root", "{tmp}/kits"), "imaging.nii.gz",
         setup=_kits_corrupt),
    Case("ham-missing-columns", "job7", ("--dataset", "ham10000", "--data-root", "{tmp}/ham"),
         "HAM10000_metadata.csv", setup=lambda t: _ham(t, "image_id,dx", ["ISIC_1,mel"])),
    Case("ham-no-rows", "job7", ("--dataset", "ham10000", "--data-root", "{tmp}/ham"), "HAM10000_metadata.csv",
         setup=lambda t: _ham(t, "lesion_id,image_id,dx", [])),
    # ---- disk and permission faults
    Case("token-bank-disk-full", J, ("--smoke",), "/shard-00000/block-", fault=_enospc_in_shard_write),
    Case("results-unwritable", J, ("--smoke", "--results", "{tmp}/results"), "{tmp}/results", fault=_deny_mkdir),
    # ---- jobs/materialize_dataset.py
    Case("materialize-unknown-dataset", "materialize", ("--dataset", "nope", "--data-root", "{tmp}",
                                                        "--out", "{tmp}/m"), "nope"),
    Case("materialize-missing-out", "materialize", ("--dataset", "busi", "--data-root", "{tmp}"), "--out"),
    Case("materialize-phantom-takes-no-root", "materialize", ("--dataset", "phantom-us", "--data-root", "{tmp}",
                                                   "--out", "{tmp}/m"), "root"),
    # ---- covtoken (cli.main)
    Case("cli-unknown-command", "cli", ("frobnicate",), "frobnicate"),
    Case("cli-unknown-option", "cli", ("audit", "--frob"), "--frob"),
    Case("cli-run-missing-job", "cli", ("run", "{tmp}/g1_missing.py"), "g1_missing.py"),
    Case("cli-run-misnamed-job", "cli", ("run", "{tmp}/job.py"), "job.py", setup=_write("job.py", "")),
    Case("cli-calibrate-missing-input", "cli", (*CAL, "{tmp}/nope.json"), "nope.json"),
    Case("cli-calibrate-not-json", "cli", (*CAL, "{tmp}/cal.json"), "cal.json", setup=_write("cal.json", "{oops")),
    Case("cli-calibrate-judged-record", "cli", (*CAL, "{tmp}/cal.json"), "judged",
         setup=_write("cal.json", json.dumps({"record_type": "covtoken.gate_record", "run_id": "g1-x"}))),
    Case("cli-calibrate-not-calibration-config", "cli", (*CAL, "{tmp}/cal.json"), "config/calibration",
         setup=_cal(**{"config/calibration": False})),
    Case("cli-calibrate-evaluation-role", "cli", (*CAL, "{tmp}/cal.json"), "dataset/splits/role",
         setup=_cal(**{"dataset/splits/role": "evaluation"})),
    Case("cli-calibrate-no-patient-digests", "cli", (*CAL, "{tmp}/cal.json"), "patient_digests",
         setup=_cal(**{"dataset/splits/patient_digests": None})),
    Case("cli-calibrate-seed-offset-ignored", "cli", (*CAL, "{tmp}/cal.json"), "dataset/revision",
         setup=_cal(**{"dataset/revision": "generator-seed-0"})),
    Case("cli-calibrate-other-entry", "cli", (*CAL, "{tmp}/cal.json"), "cal.json", setup=_cal(entry="G3/embedded")),
    Case("cli-calibrate-unknown-gate", "cli", ("thresholds", "calibrate", "--gate", "G99", "--entry", "embedded",
                                               "--out", "{tmp}/p.json"), "G99"),
    Case("cli-calibrate-unknown-entry", "cli", ("thresholds", "calibrate", "--gate", "G1", "--entry", "nope",
                                                "--out", "{tmp}/p.json"), "nope"),
    Case("cli-calibrate-no-out", "cli", ("thresholds", "calibrate", "--gate", "G1", "--entry", "embedded"), "--out"),
    Case("cli-calibrate-disk-full", "cli", (*CAL, "{tmp}/cal.json"), "{tmp}/p.json", setup=_cal(),
         fault=_enospc_on_write),
    Case("cli-lock-missing-proposal", "cli", ("thresholds", "lock", "{tmp}/p.json", "--lock", "{lock}"), "p.json"),
    Case("cli-lock-not-a-proposal", "cli", ("thresholds", "lock", "{tmp}/p.json", "--lock", "{lock}"), "p.json",
         setup=_write("p.json", '{"kind": "something"}')),
    Case("cli-lock-proposal-unreadable", "cli", ("thresholds", "lock", "{tmp}/p.json", "--lock", "{lock}"), "p.json",
         setup=_write("p.json", "{}"), fault=_deny_read("p.json")),
    Case("cli-lock-corrupt-lock", "cli", ("thresholds", "lock", "{tmp}/p.json", "--lock", "{tmp}/bad.lock.json"),
         "bad.lock.json", setup=lambda t: (_write("bad.lock.json", "{bad")(t), _write("p.json", "{}")(t))),
    Case("cli-verify-missing-lock", "cli", ("thresholds", "verify", "--lock", "{tmp}/no.lock.json"), "no.lock.json"),
    Case("cli-verify-edited-lock", "cli", ("thresholds", "verify", "--lock", "{tmp}/edited.lock.json"),
         "edited.lock.json", setup=_lock_edit),
    Case("cli-show-corrupt-lock", "cli", ("thresholds", "show", "--lock", "{tmp}/bad.lock.json"), "bad.lock.json",
         setup=_write("bad.lock.json", "[]")),
]
