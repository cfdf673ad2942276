"""Image references offline: the digest's form is checked at parse time (exit 2, one line, before any work),
the record names the image the job was launched with, and the audit and ``covtoken fetch`` catch a record
whose image contradicts its submitted spec. Whether a digest exists is the registry's to check at pull time."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from covtoken.audit import RecordAudit, _check_image
from covtoken.hfjobs import fetch as hffetch
from covtoken.hfjobs.images import IMAGES, ImageRefError, check_image_ref, digest_of, is_digest
from covtoken.hfjobs.runs import SubmitRequest, plan_submit

from hfjobs_support import G1, covtoken, snapshot  # noqa: F401  (fixture)

GOOD = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("ref", ["img", "pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime", f"pytorch/pytorch@{GOOD}",
                                 f"ghcr.io/astral-sh/uv:python3.11-bookworm-slim@{GOOD}"])
def test_well_formed_references_pass(ref: str) -> None:
    assert check_image_ref(ref) == ref
    assert digest_of(ref) == (GOOD if "@" in ref else None)


@pytest.mark.parametrize("ref", [f"img@{GOOD[:-1]}", f"img@{GOOD}0", f"img@{GOOD.upper()}", "img@sha512:" + "a" * 128,
                                 "img@sha256:" + "g" * 64, "img@", f"@{GOOD}", "", "img name", "img@latest"])
def test_malformed_references_are_refused(ref: str) -> None:
    with pytest.raises(ImageRefError, match="--image"):
        check_image_ref(ref)


def test_the_table_holds_no_malformed_digest() -> None:
    for e in IMAGES.values():
        assert e.digest is None or is_digest(e.digest)
        check_image_ref(e.name)


def test_submit_refuses_a_malformed_digest_before_any_work(snapshot: Path, monkeypatch) -> None:
    """Offline dry run: exit 2, one line naming --image, and no bundle built."""
    bundles = snapshot / "results" / "bundles"
    before = sorted(bundles.iterdir()) if bundles.exists() else []
    res = covtoken("submit", G1, "--results-repo", "someorg/r", "--dry-run", "--image", "img@sha256:abc", "--",
                   "--smoke", cwd=snapshot)
    assert res.rc == 2 and res.err.count("\n") == 1 and "--image img@sha256:abc" in res.err, res.text
    assert "sha256:<64 lowercase hex digits>" in res.err
    assert (sorted(bundles.iterdir()) if bundles.exists() else []) == before
    monkeypatch.chdir(snapshot)
    with pytest.raises(ImageRefError):
        plan_submit(SubmitRequest(job=G1, results_repo="someorg/r", image=f"img@{GOOD[:-2]}"), offline=True)


def _record(image: str, requested: str | None, digest: str | None) -> dict:
    be = {"name": "hf-jobs", "job_id": "j1", "attempt": 0, "image": image, "image_digest": digest}
    if requested is not None:
        be["image_requested"] = requested
    return {"run_id": "g1-x", "provenance": {"backend": be}}


@pytest.mark.parametrize("image,requested,digest,field", [
    (f"img@{GOOD}", f"img@{GOOD}", GOOD, None),
    ("img:1", "img:1", None, None),
    ("img:1", None, None, None),  # a record from before image_requested existed
    ("img:2", "img:1", None, "provenance/backend/image"),  # the Hub ran another image than was launched
    (f"img@{GOOD}", f"img@{GOOD}", None, "provenance/backend/image_digest"),  # digest dropped
    ("img:1", "img:1", GOOD, "provenance/backend/image_digest"),  # a digest the reference does not carry
])
def test_audit_checks_the_recorded_image(image: str, requested: str | None, digest: str | None,
                                         field: str | None) -> None:
    ra = RecordAudit(path=Path("r.json"), record=_record(image, requested, digest))
    _check_image(ra, ra.record["provenance"]["backend"])
    if field is None:
        assert ra.problems == []
    else:
        assert len(ra.problems) == 1 and f"field {field}:" in ra.problems[0], ra.problems


def test_fetch_cross_checks_the_record_against_the_submitted_spec(monkeypatch) -> None:
    spec = {"dockerImage": "img:1", "environment": {"COVTOKEN_IMAGE": "img:1"}}
    asked: list[str] = []

    def read_json(api, repo, path):  # noqa: ANN001
        asked.append(path)
        return {"spec": spec}

    monkeypatch.setattr(hffetch, "read_json", read_json)
    assert hffetch.image_mismatch(None, "o/r", _record("img:1", "img:1", None)) is None
    assert asked == ["runs/g1-x/attempts/0.json"]
    why = hffetch.image_mismatch(None, "o/r", _record("img:2", "img:2", None))
    assert why and "provenance/backend/image 'img:2'" in why and "submitted 'img:1'" in why
    spec["environment"]["COVTOKEN_IMAGE"] = "img:0"
    why = hffetch.image_mismatch(None, "o/r", _record("img:1", "img:1", None))
    assert why and "image_requested" in why and "'img:0'" in why
    local = {"run_id": "g1-y", "provenance": {"backend": {"name": "local", "job_id": None}}}
    assert hffetch.image_mismatch(None, "o/r", local) is None and len(asked) == 3
    assert json.dumps(spec)  # the spec stays plain JSON
