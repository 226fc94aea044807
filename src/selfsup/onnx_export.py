"""The backbone as an ONNX graph: `pixel_values` [B, C, H, W] (normalised) in, `x_norm_clstoken` [B, D] and
`x_norm_patchtokens` [B, N, D] out (a ViT's registers left out), through torch's TorchScript exporter.

The batch is dynamic, and so is the image size where the ViT's position-embedding resize traces faithfully:
bicubic without antialiasing (DINO, DINOv2 without registers, selfsup's default), written here as two
interpolation matrices built from the traced grid size (`resize_matrix`), equal to `F.interpolate`'s. The
antialiased resize (DINOv2's register models) has no ONNX export there: such a ViT exports at one size, its
position embedding for that size precomputed. A ResNet has no position embedding: its size is dynamic.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .core.errors import UserError
from .nn.vit import VisionTransformer

OPSET = 17
A = -0.75  # PyTorch's bicubic coefficient (aten UpSample.h)


def resize_matrix(n_out: torch.Tensor, m: int, scale: torch.Tensor) -> torch.Tensor:
    """[n_out, m]: row i holds the weights that `F.interpolate(mode="bicubic", align_corners=False)` gives the m
    inputs for output i, sampled at (i + 0.5) / scale - 0.5 with the border indices clamped. Built from tensors,
    so that a trace keeps n_out and the scale dynamic."""
    src = (torch.arange(n_out, dtype=torch.float32) + 0.5) / scale - 0.5
    i0 = src.floor()
    t = (src - i0).unsqueeze(1)
    near = lambda x: ((A + 2) * x - (A + 3)) * x * x + 1  # noqa: E731 - |x| <= 1
    far = lambda x: ((A * x - 5 * A) * x + 8 * A) * x - 4 * A  # noqa: E731 - 1 < |x| < 2
    weights = torch.cat([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)
    taps = (i0.long().unsqueeze(1) + torch.arange(-1, 3)).clamp(0, m - 1)
    return (F.one_hot(taps, m).to(weights.dtype) * weights.unsqueeze(-1)).sum(1)


def traced_pos_encoding(vit: VisionTransformer, m: int, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`VisionTransformer.interpolate_pos_encoding` without antialiasing, from tensor operations only: the grid
    kept for a square image of the native M x M grid, else resized by the factor (n + offset) / M (to the size
    when the offset is 0)."""
    pos = vit.pos_embed
    h0, w0 = h // vit.patch_size, w // vit.patch_size
    same = (h == w) & (h0 == m)
    rows, cols = [torch.where(same, F.one_hot(torch.arange(n).clamp(max=m - 1), m).float(),
                              resize_matrix(n, m, (n + vit.interpolate_offset) / m)) for n in (h0, w0)]
    grid = pos[0, 1:].float().reshape(m, m, -1).permute(2, 0, 1)  # [D, M, M]
    patch = (rows @ grid @ cols.T).permute(1, 2, 0).reshape(1, -1, pos.shape[-1])
    return torch.cat([pos[:, :1], patch.to(pos.dtype)], dim=1)


class Features(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.forward_features(x)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def write(backbone: nn.Module, image_size: int, out: Path) -> bool:
    """Export to `out`; returns whether the image size is dynamic (else it is image_size)."""
    try:
        import onnx  # noqa: F401 - the TorchScript exporter writes through it
    except ImportError:
        raise UserError("--format onnx needs onnx: pip install 'selfsup[onnx]'") from None
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: expected a file name ending in .onnx for --format onnx")
    vit = backbone if isinstance(backbone, VisionTransformer) else None
    dynamic = vit is None or not vit.interpolate_antialias
    axes = {"pixel_values": {0: "batch"} | ({2: "height", 3: "width"} if dynamic else {}),
            "x_norm_clstoken": {0: "batch"}, "x_norm_patchtokens": {0: "batch", 1: "patches"}}
    channels = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels
    example = torch.zeros(2, channels, image_size, image_size)
    if vit is not None:  # an instance attribute shadows the method during the trace
        if dynamic:  # a trace gives the image size as tensors
            m = math.isqrt(vit.pos_embed.shape[1] - 1)
            vit.interpolate_pos_encoding = lambda h, w: traced_pos_encoding(vit, m, h, w)
        else:
            fixed = vit.interpolate_pos_encoding(image_size, image_size).detach()
            vit.interpolate_pos_encoding = lambda h, w: fixed
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice
            torch.onnx.export(Features(backbone.eval()).cpu(), (example,), str(out), dynamo=False,
                              input_names=["pixel_values"], output_names=list(axes)[1:], dynamic_axes=axes,
                              opset_version=OPSET)
    finally:
        if vit is not None:
            del vit.interpolate_pos_encoding
    return dynamic
