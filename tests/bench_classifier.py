"""Latency of the served G9 classifier against a bare forward of the same backbone (a CLI, not a pytest test).

    python tests/bench_classifier.py                      # a seeded siglip-mini classifier, saved and reloaded
    python tests/bench_classifier.py --model-dir DIR      # a model folder written by jobs/g9_classifier.py
    python tests/bench_classifier.py --backbone resnet50-mini --n 200

Per image, one at a time on CPU, measured in the same run: (a) ``Predictor.predict`` (preprocessing from the
image array, metadata encoding, backbone + metadata branch + head, temperature, abstain flag, conformal set);
(b) the bare backbone forward on an already preprocessed tensor. Prints p50/p95 of each and the ratio (a)/(b).
Exits 1 when the served top-1 disagrees with the model's own forward (never because of speed).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def _model_dir(backbone: str, out: Path) -> Path:
    from covtoken.classifier.calibrate import Calibration
    from covtoken.classifier.config import ClassifierConfig
    from covtoken.classifier.experiment import build_arm_model
    from covtoken.classifier.predictor import save_model_dir

    cfg = ClassifierConfig.load("g9_phantom.json")
    cfg = ClassifierConfig.from_dict({**cfg.doc, "backbone": {"name": backbone}}, source=cfg.source,
                                     base=Path(cfg.source).parent)
    model = build_arm_model(cfg).eval()
    save_model_dir(out, model=model, cfg=cfg, calibration=Calibration(1.0, 0.1, 0.9, 0.5, 0.1, 0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="a G9 model folder (default: a seeded untrained classifier)")
    ap.add_argument("--backbone", default="siglip-mini", help="backbone of the default classifier")
    ap.add_argument("--n", type=int, default=100, help="images timed (after 10 warm-up calls)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from covtoken.classifier.model import preprocess_images
    from covtoken.classifier.predictor import Predictor
    from covtoken.data.catalog import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or _model_dir(args.backbone, Path(tmp) / "model")
        pred = Predictor.from_dir(folder)
        data = load_dataset("phantom-derm-classes", seed=7, n_patients=(args.n + 10 + 1) // 2 + 1, per_patient=2,
                            size=64)
        items = data.items[:args.n + 10]
        served, bare, mismatched = [], [], 0
        bb = pred.model.backbone
        for i, it in enumerate(items):
            t0 = time.perf_counter()
            out = pred.predict([it.image], [dict(it.meta)])[0]
            t1 = time.perf_counter()
            x = preprocess_images([it.image], pred.data_config)
            with torch.inference_mode():
                t2 = time.perf_counter()
                bb(x)
                t3 = time.perf_counter()
                meta = pred.encode_metadata([dict(it.meta)])
                top = int(pred.model(x, meta).argmax(1)[0])
            mismatched += out.top_k[0][0] != pred.labels[top]
            if i >= 10:
                served.append(t1 - t0)
                bare.append(t3 - t2)
    s50, s95 = _pct(served)
    b50, b95 = _pct(bare)
    print(f"classifier {pred.cfg.backbone['name']} on CPU ({args.threads} thread(s)), {len(served)} images, one at a time")
    print(f"  Predictor.predict (image -> top-k, abstain, set): p50 {s50:.2f} ms  p95 {s95:.2f} ms")
    print(f"  bare backbone forward (preprocessed tensor):      p50 {b50:.2f} ms  p95 {b95:.2f} ms")
    print(f"  ratio served / bare: p50 {s50 / b50:.2f}x  p95 {s95 / b95:.2f}x")
    if mismatched:
        print(f"ERROR: {mismatched} served top-1 answers differ from the model's own forward", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
