"""How well the [CLS] self-attention of each head segments the object (DINO Fig. 4): each head's attention is
thresholded to the smallest set of patches holding 60 % of its mass (dino visualize_attention.py,
--threshold 0.6), upsampled to the image by nearest neighbour, and compared with the ground-truth foreground by
the Jaccard similarity (IoU), per image, then averaged over images for each head."""
from __future__ import annotations

import torch

from ..core.errors import UserError
from ..viz.attention import MASS, mass_mask


def head_masks(attn: torch.Tensor, mass: float = MASS) -> torch.Tensor:
    """attn [N, heads, gh, gw] non-negative [CLS] -> patch attention; bool [N, heads, gh, gw]: per head, the
    smallest set of patches holding `mass` of that head's attention (largest patches first)."""
    if attn.dim() != 4:
        raise UserError(f"attention must be [N, heads, gh, gw]; got shape {list(attn.shape)}")
    if not 0.0 < mass <= 1.0:
        raise UserError(f"mass must be in (0, 1]; got {mass}")
    flat = attn.float().flatten(2)
    if (flat < 0).any() or not (flat.sum(-1) > 0).all():
        raise UserError("attention must be non-negative with a positive sum for every head of every image")
    return mass_mask(flat, mass).view(attn.shape)


def jaccard(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of bool masks [..., H, W] per leading index, float [...]; pixels where `valid` is False are left
    out. Two empty masks agree perfectly: 0 / 0 is defined as 1.0."""
    if pred.shape != target.shape or pred.dim() < 2:
        raise UserError(f"jaccard needs two masks of one shape [..., H, W]; got {list(pred.shape)} and "
                        f"{list(target.shape)}")
    if valid is not None and valid.shape != pred.shape:
        raise UserError(f"the valid mask must have the masks' shape {list(pred.shape)}; got {list(valid.shape)}")
    pred, target = pred.bool(), target.bool()
    if valid is not None:
        pred, target = pred & valid.bool(), target & valid.bool()
    inter = (pred & target).flatten(-2).sum(-1).double()
    union = (pred | target).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def attention_jaccard(attn: torch.Tensor, foreground: torch.Tensor, valid: torch.Tensor | None,
                      mass: float = MASS) -> dict:
    """DINO Fig. 4: Jaccard (%) between each head's `mass` mask, upsampled to the label size by nearest
    neighbour (each patch a block of pixels), and the foreground [N, H, W]; mean over images per head."""
    masks = head_masks(attn, mass)
    n, heads, gh, gw = masks.shape
    if foreground.dim() != 3 or foreground.shape[0] != n:
        raise UserError(f"foreground must be [N, H, W] with N = {n} (the attention's images); got "
                        f"{list(foreground.shape)}")
    h, w = foreground.shape[1:]
    if h % gh or w % gw:
        raise UserError(f"the label size {h}x{w} must be a multiple of the attention grid {gh}x{gw}")
    # nearest upsampling by an integer factor, as dino visualize_attention.py (scale_factor=patch_size)
    up = masks.repeat_interleave(h // gh, dim=2).repeat_interleave(w // gw, dim=3)
    fg = foreground.bool().unsqueeze(1).expand(-1, heads, -1, -1)
    if valid is not None:
        if valid.shape != foreground.shape:
            raise UserError(f"valid must have the foreground's shape {list(foreground.shape)}; got "
                            f"{list(valid.shape)}")
        valid = valid.bool().unsqueeze(1).expand(-1, heads, -1, -1)
    per_head = 100.0 * jaccard(up, fg, valid).mean(0)  # [heads]
    best = int(per_head.argmax())
    on_objects = object_mass(attn, foreground)
    return {"jaccard_best": float(per_head[best]), "jaccard_mean": float(per_head.mean()), "best_head": best,
            "per_head": [float(j) for j in per_head], "images": n,
            "object_mass": [float(m) for m in on_objects],
            "object_area": 100.0 * float(foreground.float().mean())}


def object_mass(attn: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """The share (%) of each head's [CLS] attention that falls on the objects, mean over images [heads]: a
    patch's attention counts in proportion to its pixels on an object. Attention spread without regard to the
    objects puts on them their share of the image's area (`object_area`); no threshold is involved."""
    gh, gw = attn.shape[-2:]
    share = torch.nn.functional.adaptive_avg_pool2d(foreground.float().unsqueeze(1), (gh, gw))  # [N, 1, gh, gw]
    a = attn.float() / attn.float().sum((-2, -1), keepdim=True)
    return 100.0 * (a * share).sum((-2, -1)).mean(0)
