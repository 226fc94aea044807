"""Pictures of the dense evaluations: attention masks against the objects, segmentation and depth probes'
predictions beside the ground truth, propagated video masks; and DAVIS-style palette PNGs of masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.dense import VideoSequence
from ..eval.dense_features import square
from .attention import mass_mask, upsample

N_SHOWN = 6


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map [n, 3] (id 0 black, 255 the ignored border colour)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def shown(img: torch.Tensor, size: int) -> np.ndarray:
    """An image [3, H, W] as the model saw it: [size, size, 3] in 0..1."""
    return (square(img.float().unsqueeze(0), size, "bicubic")[0] / 255.0).clamp(0, 1).permute(1, 2, 0).numpy()


def coloured(mask: torch.Tensor) -> np.ndarray:
    return palette()[mask.long().clamp(0, 255).numpy()]


def overlay(image: np.ndarray, mask: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """Objects (id > 0) tinted with their palette colour over the image."""
    m = mask.numpy()
    out = image.copy()
    on = (m > 0) & (m != 255)
    out[on] = (1 - alpha) * out[on] + alpha * coloured(mask)[on] / 255.0
    return out


def grid(rows: list[list[tuple[np.ndarray, str]]], path: Path, title: str, cmap: str | None = None) -> None:
    from .plots import plt  # matplotlib: imported when drawing

    n, cols = len(rows), max(len(r) for r in rows)
    height = 2.0 * n + 0.4
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, height), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                img, label = row[c]
                ax.imshow(img, cmap=cmap if img.ndim == 2 else None, interpolation="nearest")
                ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # the top 0.35 inch for the title, clear of the first row
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_mask_figure(source, f, head: int, mass: float, size: int, path: Path) -> None:
    """Image, ground-truth objects, the best head's attention and its mask, the masks of all heads."""
    rows = []
    for i in range(min(N_SHOWN, len(source))):
        attn = f.attn[i]
        masks = mass_mask(attn.flatten(1), mass).reshape(attn.shape).float()
        fg = ((f.mask[i] != 0) & (f.mask[i] != 255)).float().numpy()
        rows.append([(shown(source[i].image, size), "image"), (fg, "objects"),
                     (upsample(attn[head], (size, size)), f"head {head} attention"),
                     (upsample(masks[head], (size, size)), f"head {head}: {mass:.0%} mask"),
                     (upsample(masks.mean(0), (size, size)), "all heads' masks")])
    grid(rows, path, f"[CLS] attention of the last block against the objects ({mass:.0%} of the mass)", "viridis")


def segmentation_figure(f, pred: torch.Tensor, source, size: int, path: Path) -> None:
    rows = [[(shown(source[i].image, size), "image"), (coloured(f.mask[i]), "ground truth"),
             (coloured(pred[i]), "linear probe")] for i in range(min(N_SHOWN, len(pred)))]
    grid(rows, path, "linear segmentation of frozen patch tokens (test images)")


def depth_figure(f, pred: torch.Tensor, source, size: int, path: Path) -> None:
    top = float(f.depth[: N_SHOWN].max())
    rows = [[(shown(source[i].image, size), "image"), (f.depth[i].numpy() / top, "depth"),
             (pred[i].numpy() / top, "linear probe")] for i in range(min(N_SHOWN, len(pred)))]
    grid(rows, path, "linear depth probe on frozen patch tokens (near = dark)", "magma")


def video_rows(seq: VideoSequence, masks: list, preds: list, frames: int = 6) -> list:
    """One sequence's two rows of the video figure, on `frames` evenly spaced frames (only those are decoded):
    the frames with the ground truth, then with the propagated masks."""
    picks = np.linspace(0, len(preds) - 1, min(frames, len(preds))).round().astype(int)
    images = [seq.frame(t).permute(1, 2, 0).numpy() / 255.0 for t in picks]
    truth = [masks[t] if masks[t] is not None else torch.zeros_like(preds[0]) for t in picks]
    return [[(overlay(im, m), f"{seq.name} t={t} truth") for im, m, t in zip(images, truth, picks)],
            [(overlay(im, preds[t]), f"t={t} propagated") for im, t in zip(images, picks)]]


def video_figure(sequences: list, path: Path) -> None:
    """video_rows of each shown sequence, one under the other."""
    grid([row for rows in sequences for row in rows], path,
         "video label propagation: the first frame's mask carried by patch-feature k-NN")


def save_masks(masks: list[torch.Tensor], folder: Path) -> None:
    """Masks as DAVIS-style palette PNGs 00000.png, 00001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    pal = palette().reshape(-1).tolist()
    for t, m in enumerate(masks):
        im = Image.fromarray(m.numpy().astype(np.uint8), mode="P")
        im.putpalette(pal)
        im.save(folder / f"{t:05d}.png")
