"""G7: the label-free stage trains the first probe head on training pairs built with the sealed diagnosis
(changing pairs) instead of stable pairs only (caught by the old stage check too)."""
KIND = "roles"
JOB = "g7_dermajepa_probe"
ROLE = "fit"
HOW = "permuted"


def plant(job, monkeypatch):  # noqa: ANN001
    original = job.label_free_stage

    def leaky(data, bb, splits, P, cfg):  # noqa: ANN001, ANN202, N803
        from covtoken.arch.probe import HeadConfig, train_probe
        from covtoken.data.pairs import representatives
        from covtoken.eval.change import EvalLesions, build_pairs

        lf = original(data, bb, splits, P, cfg)
        reps = representatives(lf.table, splits["train"])
        first_view = {v.image_id: v.key for v in lf.train_views if v.index == 0}
        lesions = EvalLesions(reps=reps, sites={k: lf.table.site_of[i] for k, i in reps.items()},
                              patients={k: lf.table.patient_of[i] for k, i in reps.items()}, view_of=first_view)
        pairs = build_pairs(lesions, data.masks, seed=0)
        row = {k: i for i, k in enumerate(lf.keys)}
        zc = lf.embeddings[[row[k] for k in pairs.context]]
        zt = lf.embeddings[[row[k] for k in pairs.target]]
        head = HeadConfig.from_dict(P["heads"][0])
        lf.trained[head.name] = [train_probe(zc, zt, head, seed=int(s)) for s in P["train_seeds"]]
        return lf

    monkeypatch.setattr(job, "label_free_stage", leaky)
