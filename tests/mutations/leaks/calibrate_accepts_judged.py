"""`thresholds calibrate` accepts a judged record as a calibration input (its refusal removed). Caught: the
judged record's own patients then sit in the lock entry's calibration inputs, and the audit's calibration check
reports that calibration patients were judged."""
KIND = "guard"
SLOW = True


def clean(tmp_path):  # noqa: ANN001, ANN201
    from calib_flow import calibrate, run

    record = run(tmp_path)
    rc, proposal = calibrate(tmp_path, [record])
    assert rc == 2 and not proposal.exists(), "the judged record was not refused"
    return []


def caught(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    import covtoken.cli as cli
    from calib_flow import calibrate, lock_and_judge, run
    from covtoken.calibration_check import record_patients
    from covtoken.record import loads_strict, sha256_file

    def accept_anything(path, key):  # noqa: ANN001, ANN202 - the leak: no refusal
        doc = loads_strict(path.read_text() if hasattr(path, "read_text") else open(path).read(), source=str(path))
        return doc, {"file": str(path).rsplit("/", 1)[-1], "sha256": sha256_file(path), "run_id": doc["run_id"],
                     "code_commit": doc["provenance"]["code"]["commit"],
                     "patient_digests": sorted(record_patients(doc) or [])}

    monkeypatch.setattr(cli, "read_calibration_input", accept_anything)
    record = run(tmp_path)
    rc, proposal = calibrate(tmp_path, [record])
    assert rc == 0 and proposal.exists(), "the planted leak did not take: the judged record was still refused"
    record.rename(record.with_suffix(".first"))  # the next judged run writes its own record
    return [p for p in lock_and_judge(tmp_path, proposal) if "calibration patients were judged" in p]
