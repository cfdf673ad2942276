"""G1: the mid-layer block is selected on test AUROC instead of validation AUROC (evaluation handed the test
split as its validation split). Missed by the old stage-only check (selection is outside label_free_stage)."""
KIND = "roles"
JOB = "g1_lesion_subspace"
ROLE = "select"
HOW = "permuted"


def plant(job, monkeypatch):  # noqa: ANN001
    from covtoken.eval import recipes

    original = recipes.evaluate_g1  # the binding the g1.localisation recipe calls

    def select_on_test(*, val, test, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return original(val=test, test=test, **kwargs)

    monkeypatch.setattr(recipes, "evaluate_g1", select_on_test)
