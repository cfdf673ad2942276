"""G7: after the diagnoses are opened, every probe head is fine-tuned on the validation pairs (changing pairs
are built from the sealed diagnosis) before the pairs are scored. Missed by the old stage-only check."""
KIND = "roles"
JOB = "g7_dermajepa_probe"
ROLE = "fit"
HOW = "permuted"
SOURCE_PATCH = [(
    '        pairs = {name: build_pairs(les, data.masks, seed=cfg.seed) for name, les in lesions.items()}\n',
    '        pairs = {name: build_pairs(les, data.masks, seed=cfg.seed) for name, les in lesions.items()}\n'
    '        from covtoken.arch.probe import HeadConfig, train_probe\n'
    '        _zc = lf.embeddings[[row[k] for k in pairs["val"].context]]\n'
    '        _zt = lf.embeddings[[row[k] for k in pairs["val"].target]]\n'
    '        for _spec in P["heads"]:\n'
    '            _head = HeadConfig.from_dict(_spec)\n'
    '            lf.trained[_head.name] = [train_probe(_zc, _zt, _head, seed=int(s)) for s in P["train_seeds"]]\n',
)]
