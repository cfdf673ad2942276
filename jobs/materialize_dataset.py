# /// script
# requires-python = ">=3.11"
# dependencies = [
#     # not "covtoken" (not on the package index): launch.py installs the bundle wheel; by hand: uv run --with WHEEL
# ]
# ///
"""Materialize a raw dataset into covtoken's common layout as a Hugging Face dataset.

Raw files -> common layout (adapters in covtoken.data) -> a dataset folder with two configs, `images` (what
label-free code may read) and `masks` (evaluation only), and a dataset card naming source, licence and
citation -> optionally pushed to a private Hub dataset repo. DICOM-derived data must go through covtoken's
PS3.15 de-identifier first (`--deidentify`, key from the environment variable named by `--deid-key-env`);
otherwise the job refuses and writes nothing.

    python jobs/materialize_dataset.py --dataset busi --data-root ../shared/realdata/busi --out results/busi-hf
    COVTOKEN_DEID_KEY=... python jobs/materialize_dataset.py --dataset lung-pet-ct-dx \\
        --data-root ../shared/realdata/lung_pet_ct_dx --deidentify --out results/lpcd-hf --push-to org/lpcd-covtoken
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

DICOM_DATASETS = {"lung-pet-ct-dx"}


def main(argv: list[str] | None = None) -> int:
    from covtoken.errors import OneLineParser, report_errors

    p = OneLineParser(prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="catalog name (busi, lidc, lung-pet-ct-dx, ...)")
    p.add_argument("--data-root", required=True, help="folder of the raw dataset")
    p.add_argument("--out", required=True, help="new folder for the materialized dataset")
    p.add_argument("--push-to", help="Hub dataset repo (org/name) to upload to (private)")
    p.add_argument("--deidentify", action="store_true", help="run DICOM files through the de-identifier first")
    p.add_argument("--deid-key-env", default="COVTOKEN_DEID_KEY", help="environment variable holding the key")
    p.add_argument("--date-shift-days", type=int, default=None, help="shift dates instead of removing them")
    p.add_argument("--licence", help="SPDX licence id of the data (default: read from the catalog's licence text)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # an expected error (wrong data, a raw DICOM series, an unknown licence...) is one line and exit 2
    return report_errors(lambda: _materialize(p, args), debug=args.debug, writing=str(args.out))


def _materialize(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:

    from covtoken.data.catalog import load_dataset
    from covtoken.data.errors import DataError
    from covtoken.data.licences import spdx_licence
    from covtoken.data.materialize import dataset_card, describe_deidentification, push_dataset, write_hub_layout
    from covtoken.provenance import code_state

    log = logging.getLogger("covtoken.materialize")
    root = Path(args.data_root)
    with tempfile.TemporaryDirectory(prefix="covtoken-deid-") as staging:
        if args.deidentify:
            if args.dataset not in DICOM_DATASETS:
                p.error(f"--deidentify applies to DICOM datasets ({sorted(DICOM_DATASETS)})")
            key = os.environ.get(args.deid_key_env, "").encode()
            if len(key) < 16:
                p.error(f"set {args.deid_key_env} to a secret of at least 16 bytes (it keys UID remapping and pseudonyms)")
            from covtoken.data.lung_pet_ct_dx import deidentified_copy

            root = deidentified_copy(root, Path(staging) / "deid", key=key, date_shift_days=args.date_shift_days)
        data = load_dataset(args.dataset, root=root)
        prov = {k: v for k, v in data.provenance.items() if k != "source"}
        try:
            licence = spdx_licence(args.licence or data.provenance.get("licence", ""))
        except DataError as exc:
            p.error(str(exc))
        card = dataset_card(name=args.dataset, provenance=prov, n_images=len(data.items),
                            n_patients=len({it.patient_id for it in data.items}), licence=licence,
                            citation=data.provenance.get("citation", "see source"), kit_commit=code_state()["commit"],
                            deidentification=describe_deidentification(
                                data.items, date_shift_days=args.date_shift_days if args.deidentify else None),
                            label_columns=_label_columns(data.masks))
        out = write_hub_layout(data.items, data.masks, args.out, card=card)
    log.info("materialized %d images into %s", len(data.items), out)
    if args.push_to:
        sha = push_dataset(out, args.push_to, message=f"covtoken materialize {args.dataset}")
        log.info("pushed to %s at commit %s", args.push_to, sha)
    return 0


def _label_columns(masks) -> list[str]:  # noqa: ANN001 (EvalMasks)
    """Names of the image-level labels sealed with the masks (read by the data layer, which writes them)."""
    from covtoken.data.materialize import label_names

    return label_names(masks)


if __name__ == "__main__":
    raise SystemExit(main())
