"""PCA of patch features (DINOv2 Fig. 1): a first PCA over the patches of all images; thresholding its first
component separates foreground from background; a second PCA over the foreground patches gives 3 components,
shown as RGB (each min-max scaled over all images), so that matching parts of different images share colours."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn.vit import require_vit
from .attention import upsample
from .images import prepare


@dataclass
class PatchPCA:
    name: str
    image: np.ndarray  # [h, w, 3] in 0..1
    first: torch.Tensor  # [gh, gw]: the first component, signed so that the background is low
    foreground: torch.Tensor  # [gh, gw] bool
    rgb: torch.Tensor  # [gh, gw, 3] in 0..1, black on the background


def components(x: torch.Tensor, k: int) -> torch.Tensor:
    """Projections [N, k] of the rows of x [N, D] on their first k principal components."""
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold t: splitting into values < t and >= t maximises the between-class variance."""
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(edges[1 + np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def border(grid: tuple[int, int]) -> torch.Tensor:
    b = torch.zeros(grid, dtype=torch.bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b.flatten()


def patch_pca(feats: list[torch.Tensor], grids: list[tuple[int, int]]) -> tuple[list, list, list]:
    """Per image (first component [gh, gw], foreground [gh, gw], rgb [gh, gw, 3]) from its patch features
    [gh * gw, D]. The sign of the first component is chosen so that the image borders are mostly background."""
    x = torch.cat(feats).float()
    first = components(x, 1)[:, 0]
    on_border = torch.cat([border(g) for g in grids])
    inner = ~on_border
    if inner.any() and first[on_border].mean() > first[inner].mean():
        first = -first
    fg = first >= otsu(first.numpy())
    if fg.sum() < 3:  # nothing stands out: colour every patch
        fg = torch.ones_like(fg)
    rgb = torch.zeros(len(x), 3)
    c = components(x[fg], 3)
    c = torch.nn.functional.pad(c, (0, 3 - c.shape[1]))  # fewer than 3 feature dimensions
    rgb[fg] = (c - c.min(0).values) / (c.max(0).values - c.min(0).values).clamp_min(1e-8)
    sizes = [g[0] * g[1] for g in grids]
    split = lambda t: [p.view(*g, *t.shape[1:]) for p, g in zip(t.split(sizes), grids)]  # noqa: E731
    return split(first), split(fg), split(rgb)


@torch.no_grad()
def pca_maps(backbone: nn.Module, images: list[tuple[str, torch.Tensor]], size: int, mean, std,
             device="cpu") -> list[PatchPCA]:
    vit = require_vit(backbone, "PCA of patch features").to(device).eval()
    feats, grids, shown = [], [], []
    for _, img in images:
        x, s = prepare(img, size, vit.patch_size, mean, std)
        feats.append(vit.forward_features(x.unsqueeze(0).to(device))["x_norm_patchtokens"][0].float().cpu())
        grids.append((x.shape[1] // vit.patch_size, x.shape[2] // vit.patch_size))
        shown.append(s.permute(1, 2, 0).numpy())
    firsts, fgs, rgbs = patch_pca(feats, grids)
    return [PatchPCA(n, s, f, g, c) for (n, _), s, f, g, c in zip(images, shown, firsts, fgs, rgbs)]


def pca_figure(maps: list[PatchPCA], path: Path) -> dict:
    """A PNG: per image (one column), the image, the first component with the foreground outlined, the RGB of
    the next 3 components on the foreground."""
    from .plots import plt  # matplotlib: imported when drawing

    fig, axes = plt.subplots(3, len(maps), figsize=(2.2 * len(maps), 6.8), squeeze=False)
    for j, m in enumerate(maps):
        shape = m.image.shape[:2]
        axes[0, j].imshow(m.image)
        axes[0, j].set_title(m.name, fontsize=8)
        axes[1, j].imshow(upsample(m.first, shape), cmap="coolwarm")
        axes[1, j].contour(upsample(m.foreground, shape), levels=[0.5], colors=["k"], linewidths=0.8)
        axes[1, j].set_title(f"1st component, {int(m.foreground.sum())}/{m.foreground.numel()} fg", fontsize=8)
        rgb = torch.nn.functional.interpolate(m.rgb.permute(2, 0, 1)[None], size=shape, mode="nearest")[0]
        axes[2, j].imshow(rgb.permute(1, 2, 0).numpy())
        axes[2, j].set_title("components 1-3 of fg as RGB", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("PCA of patch features across the images (DINOv2 Fig. 1)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"png": str(path), "images": [{"image": m.name, "grid": list(m.first.shape),
                                          "foreground_patches": int(m.foreground.sum())} for m in maps]}
