"""G1: after the masks are opened, the job body refits every arm on the training images with the least lesion
and rescores - a fit that reads training labels. Missed by the old stage-only check (it is outside
label_free_stage)."""
KIND = "roles"
JOB = "g1_lesion_subspace"
ROLE = "fit"
HOW = "permuted"
SOURCE_PATCH = [(
    '    labels = token_labels(frac, positive_min=P["positive_min"], negative_max=P["negative_max"])\n',
    '    labels = token_labels(frac, positive_min=P["positive_min"], negative_max=P["negative_max"])\n'
    '    from covtoken.subspace import score_blocks as _score_blocks\n'
    '    _area = frac[rows["train"]].sum(axis=1)\n'
    '    _clean = rows["train"][_area <= np.median(_area)]\n'
    '    scores = _score_blocks(bank.tokens, blocks=blocks, constructions=list(cfg.constructions), fit_rows=_clean,\n'
    '                           score_rows=np.concatenate([rows["val"], rows["test"]]),\n'
    '                           params=dict(P["construction_params"]), seed=cfg.seed,\n'
    '                           max_fit_tokens=int(P["max_fit_tokens"]))\n',
)]
