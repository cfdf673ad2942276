"""A calibration run on the same patients as the judged run: the job ignores the locked calibration seed offset.
Caught twice: `thresholds calibrate` refuses the run (its generated patients do not come from seed + offset), and
when such an input is locked anyway, the audit's calibration check finds the judged record's patients in it."""
import dataclasses
import json

KIND = "guard"
SLOW = True


def clean(tmp_path):  # noqa: ANN001, ANN201
    from calib_flow import calibrate, lock_and_judge, run

    cal = run(tmp_path, "--calibration")
    rc, proposal = calibrate(tmp_path, [cal])
    assert rc == 0, "a genuine calibration run was refused"
    return lock_and_judge(tmp_path, proposal)


def caught(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    import covtoken.runner as runner
    from calib_flow import calibrate, lock_and_judge, run
    from covtoken.lock import _input_patients, gate_template
    from covtoken.record import sha256_file

    original = runner.load_gate_dataset

    def no_offset(cfg, params, **kwargs):  # noqa: ANN001, ANN003, ANN202 - the leak: calibration seed offset ignored
        return original(dataclasses.replace(cfg, calibration=False), params, **kwargs)

    monkeypatch.setattr(runner, "load_gate_dataset", no_offset)
    cal = run(tmp_path, "--calibration")
    found = []
    rc, proposal = calibrate(tmp_path, [cal])
    if rc == 0:
        return []  # the refusal missed it
    found.append(f"thresholds calibrate refused it (exit {rc})")
    # the input locked anyway (as an older kit would have): the audit check must still see the shared patients
    doc = json.loads(cal.read_text())
    template = gate_template("G1")
    entry = template["entries"]["embedded"]
    proposal.write_text(json.dumps({
        "kind": "covtoken.threshold_proposal", "gate_id": "G1", "entry": "embedded", "claim": template["claim"],
        "criteria": entry["criteria"], "parameters": entry["parameters"],
        "calibration": {**entry.get("calibration", {}), "proposed_at": "2026-01-01T00:00:00Z", "proposed_values": {},
                        "inputs": [{"file": cal.name, "sha256": sha256_file(cal), "run_id": doc["run_id"],
                                    "code_commit": doc["code"]["commit"],
                                    "patient_digests": _input_patients(doc["dataset"])}]}}))
    overlaps = lock_and_judge(tmp_path, proposal)
    if not any("calibration patients were judged" in p for p in overlaps):
        return []  # the audit check missed it
    return found + overlaps
