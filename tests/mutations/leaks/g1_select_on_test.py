"""G1: the mid-layer block is selected on test AUROC instead of validation AUROC (evaluation handed the test
split as its validation split). Missed by the old stage-only check (selection is outside label_free_stage)."""
KIND = "roles"
JOB = "g1_lesion_subspace"
ROLE = "select"
HOW = "permuted"


def plant(job, monkeypatch):  # noqa: ANN001
    from covtoken.eval import localisation

    original = localisation.evaluate_g1

    def select_on_test(*, val, test, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return original(val=test, test=test, **kwargs)

    monkeypatch.setattr(localisation, "evaluate_g1", select_on_test)
