"""Self-attention maps of the last block (DINO Fig. 1 and 3) and their 60 %-mass masks (DINO Fig. 4).

The [CLS] query's attention over the patch tokens, per head. Register tokens (Darcet et al.) are left out of
the maps and shown apart: the share of each head's [CLS] attention that goes to each register."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn.vit import require_vit
from .images import prepare

MASS = 0.6  # DINO Fig. 4: keep 60 % of the attention mass


@dataclass
class AttentionMap:
    name: str
    image: np.ndarray  # [h, w, 3] in 0..1, what the model saw
    patches: torch.Tensor  # [heads, gh, gw]: [CLS] -> patch attention
    registers: torch.Tensor  # [heads, R]: [CLS] -> register attention


@torch.no_grad()
def cls_attention(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] attention of each head of the last block for one image x [3, h, w]: over the patch grid
    [heads, h/p, w/p] and over the registers [heads, R]."""
    vit = require_vit(backbone, "attention maps")
    p = vit.patch_size
    attn = vit.get_last_self_attention(x.unsqueeze(0))[0, :, 0]  # [heads, N]: row of the [CLS] query
    r = 1 + vit.n_registers  # token order: [CLS], registers, patches
    return attn[:, r:].reshape(-1, x.shape[1] // p, x.shape[2] // p), attn[:, 1:r]


def mass_mask(attn: torch.Tensor, mass: float = MASS) -> torch.Tensor:
    """Per row of attn [..., n]: the smallest set of entries whose share of the row's sum is at least `mass`
    (the largest entries first), as a bool mask [..., n]."""
    share = attn / attn.sum(-1, keepdim=True)
    val, idx = share.sort(-1, descending=True)
    keep = (val.cumsum(-1) - val) < mass  # the mass of the larger entries is still short of `mass`
    return torch.zeros_like(keep).scatter(-1, idx, keep)


def attention_maps(backbone: nn.Module, images: list[tuple[str, torch.Tensor]], size: int, mean, std,
                   device="cpu") -> list[AttentionMap]:
    vit = require_vit(backbone, "attention maps").to(device).eval()
    maps = []
    for name, img in images:
        x, shown = prepare(img, size, vit.patch_size, mean, std)
        patches, registers = cls_attention(vit, x.to(device))
        maps.append(AttentionMap(name, shown.permute(1, 2, 0).numpy(), patches.float().cpu(), registers.float().cpu()))
    return maps


def upsample(grid: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """A patch grid [gh, gw] shown at image resolution: each patch a block of pixels (nearest, as DINO)."""
    return torch.nn.functional.interpolate(grid[None, None].float(), size=shape, mode="nearest")[0, 0].numpy()


def attention_figure(maps: list[AttentionMap], path: Path, mass: float = MASS) -> dict:
    """A PNG grid, two rows per image: the image and each head's attention; the mean over heads and each
    head's `mass` mask. With registers, a last column shows each head's [CLS] -> register attention."""
    from .plots import plt  # matplotlib: imported when drawing

    heads, n_reg = maps[0].patches.shape[0], maps[0].registers.shape[1]
    cols = 1 + heads + (1 if n_reg else 0)
    fig, axes = plt.subplots(2 * len(maps), cols, figsize=(1.9 * cols, 3.9 * len(maps)), squeeze=False)
    summary = []
    for i, m in enumerate(maps):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        shape = m.image.shape[:2]
        top[0].imshow(m.image)
        top[0].set_title(m.name, fontsize=8)
        mean_map = m.patches.mean(0)
        bottom[0].imshow(m.image)
        bottom[0].imshow(upsample(mean_map / mean_map.max(), shape), cmap="inferno", alpha=0.7, vmin=0, vmax=1)
        bottom[0].set_title("mean of heads", fontsize=8)
        masks = mass_mask(m.patches.flatten(1), mass).view_as(m.patches)
        for h in range(heads):
            a = m.patches[h]
            top[1 + h].imshow(upsample(a / a.max(), shape), cmap="inferno", vmin=0, vmax=1)
            top[1 + h].set_title(f"head {h}", fontsize=8)
            bottom[1 + h].imshow(m.image * (0.25 + 0.75 * upsample(masks[h], shape)[..., None]))
            bottom[1 + h].contour(upsample(masks[h], shape), levels=[0.5], colors=["#00e5ff"], linewidths=0.8)
            bottom[1 + h].set_title(f"{mass:.0%} mass: {int(masks[h].sum())}/{masks[h].numel()}", fontsize=8)
        if n_reg:
            top[-1].imshow(m.registers.numpy(), cmap="viridis", aspect="auto")
            top[-1].set_title(f"[CLS]->registers\n{m.registers.sum(1).mean():.0%} of attention", fontsize=8)
            top[-1].set_xlabel("register", fontsize=7)
            top[-1].set_ylabel("head", fontsize=7)
            bottom[-1].axis("off")
        summary.append({"image": m.name, "grid": list(m.patches.shape[1:]),
                        "mask_patches": [int(k.sum()) for k in masks],
                        "register_share": [float(s) for s in m.registers.sum(1)]})
    for ax in axes.flat:
        if ax.images or ax.collections:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"[CLS] self-attention of the last block, per head; bottom rows: patches holding {mass:.0%} "
                 "of each head's attention", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"png": str(path), "heads": heads, "registers": n_reg, "mass": mass, "images": summary}
