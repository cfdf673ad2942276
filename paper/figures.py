"""Paper figures, drawn from gate records and their artefacts only.

Each figure is a function ``draw(inputs) -> (Figure, caption)`` registered under a name; ``inputs`` is a
list of :class:`RecordInput` (the record and the folder it lives in, for its artefacts). Captions name the
records a figure was drawn from. Figures are sized for one column (3.4 in wide) with labelled axes and units.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..record import loads_strict, sha256_file  # noqa: E402

__all__ = ["RecordInput", "FIGURES", "register_figure", "artefact"]

COLUMN_IN = 3.4
plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
                     "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": 100, "savefig.dpi": 300})


@dataclass(frozen=True)
class RecordInput:
    key: str
    path: Path  # the record file
    record: dict

    @property
    def run_id(self) -> str:
        return self.record["run_id"]


def artefact(inp: RecordInput, name: str) -> tuple[object, Path]:
    """Load artefact ``name`` of a record (checked against its recorded sha256)."""
    for art in inp.record["artefacts"]:
        if art["path"].rsplit("/", 1)[-1] == name:
            path = inp.path.parent / art["path"]
            if sha256_file(path) != art["sha256"]:
                raise ValueError(f"{path}: artefact does not match the hash in {inp.path}")
            return loads_strict(path.read_text(), source=str(path)), path
    raise ValueError(f"{inp.path}: record has no artefact {name!r}")


Drawer = Callable[[list[RecordInput]], tuple[Figure, str, list[Path]]]
FIGURES: dict[str, Drawer] = {}


def register_figure(name: str) -> Callable[[Drawer], Drawer]:
    def deco(fn: Drawer) -> Drawer:
        if name in FIGURES:
            raise ValueError(f"figure {name!r} registered twice")
        FIGURES[name] = fn
        return fn
    return deco


def _runs(inputs: list[RecordInput]) -> str:
    return ", ".join(f"`{i.run_id}`" for i in inputs)


@register_figure("g1_auroc_per_block")
def g1_auroc_per_block(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """Test token AUROC per block for constructions A (density) and B (residual), with 95% CIs."""
    (inp,) = inputs
    table, art_path = artefact(inp, "auroc_per_block.json")
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.4), layout="constrained")
    styles = {"A_gauss": ("A: Gaussian", "o", "C0"), "A_knn": ("A: kNN", "s", "C1"), "B_pca": ("B: PCA residual", "^", "C2")}
    blocks_all = []
    for k, (cons, (label, marker, color)) in enumerate(styles.items()):
        rows = sorted((r for r in table if r["construction"] == cons), key=lambda r: r["block"])
        if not rows:
            continue
        b = [r["block"] for r in rows]
        blocks_all += b
        xs = [x + (k - 1) * 0.12 for x in b]  # dodge overlapping error bars
        y = [r["test_auroc"] for r in rows]
        lo = [r["test_auroc"] - r["test_ci"][0] for r in rows]
        hi = [r["test_ci"][1] - r["test_auroc"] for r in rows]
        ax.errorbar(xs, y, yerr=[lo, hi], marker=marker, ms=3, lw=1, capsize=2, color=color, label=label)
    base = [r for r in table if r["construction"] == "intensity"]
    if base:
        ax.axhline(base[0]["test_auroc"], color="0.4", ls="--", lw=0.8, label=f"intensity baseline ({base[0]['arm'].split(':')[1]})")
    ax.axhline(0.5, color="0.7", ls=":", lw=0.8)
    ax.set_xlabel("block (0-based index)")
    ax.set_ylabel("token lesion AUROC (test patients)")
    ax.set_xticks(sorted(set(blocks_all)))
    ax.legend(loc="lower right", frameon=False, ncol=2)
    sel = inp.record["metrics"]["selected_block"]["value"]
    ax.axvline(sel, color="0.85", lw=4, zorder=0)
    bb = inp.record["provenance"]["backbone"]["name"]
    ds = inp.record["provenance"]["dataset"]["id"]
    caption = (f"Token-level lesion AUROC on test patients per block ({bb}, {ds}); bars are patient-clustered 95% "
               f"bootstrap CIs; the grey band marks the block selected on validation. Drawn from record {_runs(inputs)}.")
    return fig, caption, [art_path]


@register_figure("g2_cross_modality")
def g2_cross_modality(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """Density vs CLS-attention saliency AUROC per modality, with 95% CIs."""
    (inp,) = inputs
    m = inp.record["metrics"]
    mods = [str(d).split("=", 1)[0] for d in inp.record["provenance"]["config"]["datasets"]]
    labels = {"lung_ct": "lung CT", "kidney_ct": "kidney CT", "breast_us": "breast US"}
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.3), layout="constrained")
    width = 0.38
    for k, (arm, label, color) in enumerate((("auroc_density", "density A (Gaussian)", "C0"),
                                              ("auroc_saliency", "CLS-attention saliency", "C3"))):
        vals = [m[f"{arm}_{x}"] for x in mods]
        xs = [i + (k - 0.5) * width for i in range(len(mods))]
        ax.bar(xs, [v["value"] for v in vals], width, color=color, alpha=0.85, label=label,
               yerr=[[v["value"] - v["ci"][0] for v in vals], [v["ci"][1] - v["value"] for v in vals]], capsize=2,
               error_kw={"lw": 0.8})
    ax.axhline(0.5, color="0.5", ls=":", lw=0.8)
    ax.set_xticks(range(len(mods)), [labels.get(x, x) for x in mods])
    ax.set_ylabel("token lesion AUROC (test patients)")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", frameon=False, fontsize=6.5)
    bb = inp.record["provenance"]["backbone"]["name"]
    blk = inp.record["provenance"]["backbone"]["blocks"][0]
    caption = (f"Density construction A vs CLS-attention saliency at block {blk} of {bb}, per modality; bars are "
               f"patient-clustered 95% bootstrap CIs, dotted line = chance. Drawn from record {_runs(inputs)}.")
    return fig, caption, []


@register_figure("g4_coverage")
def g4_coverage(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """Test coverage over random calibration/test splits against the nominal level and the exact validity band."""
    (inp,) = inputs
    cert, art_path = artefact(inp, "certificate.json")
    alpha = cert["alpha"]
    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_IN, 2.2), layout="constrained", sharey=True)
    panels = (("crc", "risk control:\nlesion-token coverage"), ("allkept", "split conformal:\nall lesion tokens kept"))
    for ax, (key, title) in zip(axes, panels):
        cov = cert["splits"][f"{key}_coverage"]
        lo, hi = cert["bands"][key]
        ax.hist(cov, bins=20, color="C0", alpha=0.8)
        ax.axvspan(lo, hi, color="C2", alpha=0.25, label="validity band")
        ax.axvline(1 - alpha, color="k", lw=0.8, ls="--", label=f"nominal 1-α = {1 - alpha:.2f}")
        ax.axvline(sum(cov) / len(cov), color="C3", lw=1.2, label="mean over splits")
        ax.set_title(title)
        ax.set_xlabel("test coverage per split")
    axes[0].set_ylabel("number of splits")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False, fontsize=5.5)
    caption = (f"Conformal retention at α = {alpha}: test coverage over {len(cert['splits']['crc_coverage'])} random "
               f"patient-level calibration/test splits (n = {cert['n_cal']} calibration patients), the nominal level "
               f"and the exact band of each certificate. Drawn from record {_runs(inputs)}.")
    return fig, caption, [art_path]


@register_figure("g5_flops_sensitivity")
def g5_flops_sensitivity(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """FLOPs saved against small-lesion sensitivity over (exit block, keep fraction), operating point marked."""
    (inp,) = inputs
    curve, art_path = artefact(inp, "curve.json")
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.4), layout="constrained")
    exits = sorted({p["exit_after"] for p in curve["points"]})
    for k, e in enumerate(exits):
        pts = sorted((p for p in curve["points"] if p["exit_after"] == e), key=lambda p: p["flops_ratio"])
        x = [p["flops_ratio"] for p in pts]
        y = [p["small_lesion_sensitivity"] for p in pts]
        err = [[p["small_lesion_sensitivity"] - p["small_lesion_sensitivity_ci"][0] for p in pts],
               [p["small_lesion_sensitivity_ci"][1] - p["small_lesion_sensitivity"] for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", ms=2.5, lw=0.8, capsize=1.5, color=f"C{k}", label=f"exit after block {e}")
    op = curve["operating_point"]
    m = inp.record["metrics"]
    ax.plot([m["flops_ratio"]["value"]], [m["small_lesion_sensitivity"]["value"]], marker="*", ms=9, color="k",
            ls="none", label=f"locked point (block {op['exit_after']}, keep {op['keep_fraction']:.0%})")
    ax.set_xlabel("FLOPs reduction (full / routed MACs, ×)")
    ax.set_ylabel("small-lesion sensitivity")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", frameon=False, fontsize=5.5)
    caption = (f"Routed depth: small-lesion sensitivity (lesions of at most {curve['small_lesion_max_area_tokens']} "
               f"token; patient-clustered 95% CIs) against the analytic FLOPs reduction, over exit block and kept "
               f"fraction. Drawn from record {_runs(inputs)}.")
    return fig, caption, [art_path]


@register_figure("g3_miss_vs_keep")
def g3_miss_vs_keep(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """Small-lesion miss rate against keep rate: membership vs CLS-attention saliency vs random keep."""
    (inp,) = inputs
    curves, art_path = artefact(inp, "miss_curves.json")
    curves = sorted(curves, key=lambda r: r["keep_rate"])
    x = [100 * r["keep_rate"] for r in curves]
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.3), layout="constrained")
    for key, label, color, marker in (("membership", "membership (lesion subspace)", "C0", "o"),
                                      ("saliency", "CLS-attention saliency (EViT)", "C3", "s"),
                                      ("random", "random keep", "0.5", "^")):
        y = [r[key] for r in curves]
        err = [[r[key] - r[f"{key}_ci"][0] for r in curves], [r[f"{key}_ci"][1] - r[key] for r in curves]]
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, ms=3, lw=1, capsize=2, label=label)
    ax.set_xlabel("tokens kept per image (%)")
    ax.set_ylabel("small-lesion miss rate")
    ax.set_ylim(-0.02, 1.0)
    ax.legend(loc="upper right", frameon=False, fontsize=6)
    caption = ("Small lesions (area of at most one token) with no kept token, against the share of tokens kept, on test "
               "patients; bars are patient-clustered 95% bootstrap CIs. Drawn from record " + _runs(inputs) + ".")
    return fig, caption, [art_path]


@register_figure("g6_negative")
def g6_negative(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """The negative result: recall of the coverage-constrained pruner vs membership, and why (functional drops)."""
    (inp,) = inputs
    m = inp.record["metrics"]
    mech, art_path = artefact(inp, "mechanism.json")
    fig, (a, b) = plt.subplots(1, 2, figsize=(COLUMN_IN, 2.0), layout="constrained",
                               gridspec_kw={"width_ratios": [1, 1.25]})
    names = [("small_recall_membership", "member-\nship", "C0"), ("small_recall_pruner", "coverage\npruner", "C1"),
             ("small_recall_random", "random\nkeep", "0.6")]
    vals = [m[k] for k, _, _ in names]
    a.bar(range(3), [v["value"] for v in vals], color=[c for *_, c in names],
          yerr=[[v["value"] - (v["ci"] or [v["value"]] * 2)[0] for v in vals],
                [(v["ci"] or [v["value"]] * 2)[1] - v["value"] for v in vals]], capsize=2, error_kw={"lw": 0.8})
    a.set_xticks(range(3), [lbl for _, lbl, _ in names], fontsize=5)
    a.set_ylabel("small-lesion recall")
    a.set_ylim(0, 1.05)
    keys = (("coding_rate", "coding\nrate"), ("rankme", "RankMe"), ("energy", "energy"))
    for k, (key, _) in enumerate(keys):
        for j, (prefix, color) in enumerate((("drop_", "C1"), ("random_drop_", "0.7"))):
            b.boxplot([[100 * r[f"{prefix}{key}"] for r in mech]], positions=[3 * k + j], widths=0.7, showfliers=False,
                      patch_artist=True, boxprops={"facecolor": color, "alpha": 0.7}, medianprops={"color": "k"})
    b.hlines(100 * (1 - _coverage_fraction(inp.record)), -0.6, 1.6, color="C3", ls="--", lw=1.0,
             label="slack of the constraint\n(on the coding rate)")
    b.plot([], [], "s", color="C1", alpha=0.7, label="all lesion tokens removed")
    b.plot([], [], "s", color="0.7", alpha=0.7, label="as many random tokens")
    b.set_xticks([0.5, 3.5, 6.5], [lbl for _, lbl in keys], fontsize=6)
    b.set_ylabel("drop of the functional (%)")
    lo, hi = b.get_ylim()
    b.set_ylim(lo, hi + 0.45 * (hi - lo))  # room for the legend above the boxes
    b.legend(loc="upper right", frameon=False, fontsize=5)
    caption = ("The negative result: a pruner that keeps the coding rate within the locked slack recalls fewer small "
               "lesions than membership pruning (left; patient-clustered 95% CIs), because removing every lesion "
               "token of an image moves the coverage functionals by about as much as the slack, not more (right: per "
               "test image, lesion tokens vs the same number of random tokens). Drawn from record " + _runs(inputs)
               + ".")
    return fig, caption, [art_path]


@register_figure("g7_probe")
def g7_probe(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """Directional AUROC on the held-out nuisance family: the probe head vs raw cosine and pixel baselines."""
    (inp,) = inputs
    m = inp.record["metrics"]
    rows = [("probe_auroc", "probe head", "C0"), ("raw_cosine_auroc", "raw cosine", "C2"),
            ("pixel_l2_auroc", "pixel L2", "0.6"), ("ssim_distance_auroc", "SSIM", "0.4")]
    rows = [r for r in rows if r[0] in m]
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 1.9), layout="constrained")
    vals = [m[k] for k, _, _ in rows]
    y = range(len(rows))[::-1]
    ax.barh(list(y), [v["value"] for v in vals], color=[c for *_, c in rows],
            xerr=[[v["value"] - v["ci"][0] for v in vals], [v["ci"][1] - v["value"] for v in vals]], capsize=2,
            error_kw={"lw": 0.8})
    ax.set_yticks(list(y), [lbl for _, lbl, _ in rows])
    ax.axvline(0.5, color="0.5", ls=":", lw=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("directional AUROC (test lesions)")
    held = inp.record["provenance"].get("parameters", {}).get("held_out_family", "held-out")
    caption = (f"Change detection on the held-out {held} nuisance family: the probe head against raw cosine and pixel "
               f"baselines (the strongest baseline is chosen on validation); bars are 95% CIs from a bootstrap over "
               f"lesions. Drawn from record {_runs(inputs)}.")
    return fig, caption, []


@register_figure("g9_risk_coverage")
def g9_risk_coverage(inputs: list[RecordInput]) -> tuple[Figure, str, list[Path]]:
    """G9: selective top-1 accuracy against coverage of the temperature-scaled classifier on test patients."""
    (inp,) = inputs
    tables, art_path = artefact(inp, "g9_tables.json")
    rc = tables["risk_coverage"]
    m = inp.record["metrics"]
    fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.2), layout="constrained")
    ax.plot(rc["coverage"], [1 - r for r in rc["risk"]], color="C0", lw=1.2, label="configured model")
    ans = 1 - m["abstain_rate"]["value"]
    if "selective_top1" in m:
        ax.plot([ans], [m["selective_top1"]["value"]], "o", color="C3", ms=4,
                label="calibrated abstain threshold")
    ax.axhline(m["top1"]["value"], color="0.5", ls=":", lw=0.8, label="top-1 without abstaining")
    ax.set_xlim(0, 1.01)
    ax.set_xlabel("coverage (fraction of test images answered)")
    ax.set_ylabel("selective top-1 accuracy")
    ax.legend(loc="lower left", frameon=False)
    caption = (f"Risk-coverage of the G9 classifier on test patients (AURC {m['aurc']['value']:.3f}, patient-clustered "
               f"95% CI {m['aurc']['ci'][0]:.3f}-{m['aurc']['ci'][1]:.3f}); the abstain threshold was fitted on "
               f"calibration patients only. Drawn from record {_runs(inputs)}.")
    return fig, caption, [art_path]


def _coverage_fraction(record: dict) -> float:
    """The locked coverage constraint c of G6 (F(kept) >= c * F(all)), from the record's protocol parameters."""
    try:
        return float(record["provenance"]["parameters"]["pruner"]["target"])
    except KeyError:
        raise ValueError(f"record {record['run_id']}: no locked pruner target in provenance/parameters") from None


def save(fig: Figure, out_dir: Path, name: str) -> dict[str, str]:
    """Write PNG and PDF (no timestamps, so identical inputs give identical files); return their sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None})
    plt.close(fig)
    return {"png": sha256_file(png), "pdf": sha256_file(pdf)}


def input_hashes(root: Path, paths: list[Path]) -> dict[str, str]:
    """sha256 of each input, keyed by its path relative to ``root`` (the repository root)."""
    return {Path(p).resolve().relative_to(root).as_posix(): sha256_file(p) for p in paths}


def dumps_manifest(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"
