"""Feature maps of a pretrained encoder as a figure (PNG bytes; nothing written to disk here)."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .g8 import G8Inputs

__all__ = ["pca_rgb", "feature_map_figure"]


def pca_rgb(tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """First three principal components of ``(n, N, d)`` patch tokens (fitted on all of them) as ``(n, gh, gw, 3)``
    colours in [0, 1]."""
    from sklearn.decomposition import PCA

    x = tokens.reshape(-1, tokens.shape[-1])
    p = PCA(n_components=3, random_state=0).fit_transform(x)
    lo, hi = np.percentile(p, 1, axis=0), np.percentile(p, 99, axis=0)
    p = np.clip((p - lo) / np.where(hi > lo, hi - lo, 1), 0, 1)
    return p.reshape(tokens.shape[0], grid[0], grid[1], 3)


def feature_map_figure(inp: "G8Inputs", chosen: str, token_masks: dict, *, n_images: int = 4) -> bytes:
    """Rows: test images; columns: PCA maps of random-init and pretrained tokens, segmentation-probe masks of both
    (``token_masks``: arm -> per test image a token-grid 0/1 mask, from recipe ``g8.segmentation``).

    Returns:
        PNG bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    te = np.asarray(inp.rows["test"])[:min(n_images, len(token_masks["trained"]))]
    maps = {name: pca_rgb(inp.tokens[arm][te], inp.grid) for name, arm in (("random init", "random_init"),
                                                                          (f"LeJEPA {chosen}", chosen))}
    fig, axes = plt.subplots(len(te), 4, figsize=(8, 2 * len(te)), squeeze=False)
    for r, i in enumerate(te):
        cols = [*maps.items(), ("probe mask, random init", np.asarray(token_masks["random_init"][r])),
                ("probe mask, LeJEPA", np.asarray(token_masks["trained"][r]))]
        for c, (title, img) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(img[r] if img.ndim == 4 else img, cmap=None if img.ndim == 4 else "gray",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(inp.image_ids[i], fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
