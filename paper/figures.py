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
    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_IN, 1.9), layout="constrained", sharey=True)
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
    axes[1].legend(loc="upper left", frameon=False, fontsize=5.5)
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
