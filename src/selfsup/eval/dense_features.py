"""Frozen patch features of dense data (masks, depth, video): one pass per (backbone, data, split), cached.

Images are resized so that the shorter side is `size` and centre-cropped to size x size (bicubic, antialiased,
as DINO's and DINOv2's evaluation transforms resize); masks and depth maps go through the same crop with
nearest resampling, so a label is never an average of two classes. What a pass keeps, per image:
- the patch tokens of the last `layers` blocks [L, D, h, w] (float16: they are the bulk of the cache) and their
  [CLS] tokens [L, D] (DINOv2's `get_intermediate_layers(..., reshape=True, return_class_token=True)`);
- the last block's [CLS] attention over the patches, per head [heads, h, w] (DINO Fig. 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.progress import ProgressLine
from ..data.dense import DenseSource, VideoSequence, VideoSource
from ..nn.vit import require_vit
from .cache import FeatureCache

BATCH = 64


def square(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """x [B, C, H, W] with its shorter side resized to `size`, centre-cropped to size x size."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        smooth = mode != "nearest"
        x = F.interpolate(x, size=(nh, nw), mode=mode, **({"antialias": True, "align_corners": False} if smooth else {}))
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


def model_input(images: list[torch.Tensor], size: int, mean, std) -> torch.Tensor:
    """uint8 images [3, H, W] of any sizes -> one normalised batch [B, 3, size, size]."""
    x = torch.cat([square(img.float().unsqueeze(0) / 255.0, size, "bicubic").clamp(0, 1) for img in images])
    return normalise(x, mean, std)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[B, 3, H, W] in 0..1 -> the model's input, by the backbone's mean and std."""
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def label_map(t: torch.Tensor, size: int) -> torch.Tensor:
    """A mask or depth map [H, W] through the images' resize and crop (nearest)."""
    return square(t[None, None].float(), size, "nearest")[0, 0].to(t.dtype)


def check_size(size: int, patch: int) -> None:
    if size < patch or size % patch:
        raise UserError(f"--size {size}: expected a multiple of the patch size {patch}")


@torch.no_grad()
def patch_features(vit: nn.Module, x: torch.Tensor, layers: int) -> dict[str, torch.Tensor]:
    """patch [B, L, D, h, w] (float16), cls [B, L, D] and attn [B, heads, h, w] of one input batch."""
    outs = vit.get_intermediate_layers(x, n=min(layers, len(vit.blocks)), reshape=True, return_class_token=True)
    attn = vit.get_last_self_attention(x)[:, :, 0, 1 + vit.n_registers :]  # [CLS] row over the patches
    h, w = x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size
    return {"patch": torch.stack([p for p, _ in outs], 1).half().cpu(), "cls": torch.stack([c for _, c in outs], 1).cpu(),
            "attn": attn.reshape(len(x), -1, h, w).float().cpu()}


@dataclass
class DenseFeatures:
    patch: torch.Tensor  # float16 [N, L, D, h, w]
    cls: torch.Tensor  # [N, L, D]
    attn: torch.Tensor  # [N, heads, h, w]
    mask: torch.Tensor | None  # int64 [N, size, size]
    depth: torch.Tensor | None  # float32 [N, size, size]


def dense_features(vit: nn.Module, source: DenseSource, spec: str, split: str, size: int, layers: int, mean, std,
                   device, cache: FeatureCache) -> DenseFeatures:
    """The features of one split of a dense set, with its masks and depth maps at the features' resolution."""
    vit = require_vit(vit, "dense evaluation").to(device).eval()
    check_size(size, vit.patch_size)

    def compute():
        parts: list[dict] = []
        with ProgressLine(len(source), f"patch features {spec}:{split}") as progress:
            for i in range(0, len(source), BATCH):
                items = [source[j] for j in range(i, min(i + BATCH, len(source)))]
                out = patch_features(vit, model_input([it.image for it in items], size, mean, std).to(device), layers)
                if source.has_masks:
                    out["mask"] = torch.stack([label_map(it.mask, size) for it in items])
                if source.has_depth:
                    out["depth"] = torch.stack([label_map(it.depth, size) for it in items])
                parts.append(out)
                progress.update(len(items))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, torch.arange(len(source))

    feats, _ = cache.get(spec, split, source, compute, kind="dense", size=size, layers=layers, mean=list(mean),
                         std=list(std))
    return DenseFeatures(feats["patch"], feats["cls"], feats["attn"], feats.get("mask"), feats.get("depth"))


@dataclass
class VideoFeatures:
    name: str
    patch: torch.Tensor  # half [T, h, w, D] (last block, normalised): a view of the set's store
    sequence: VideoSequence  # frames and masks at their own size, read when needed (DAVIS scores at that size)


def video_grid(h: int, w: int, size: int, patch: int) -> tuple[int, int]:
    """The input size (rows, cols) of an H x W frame (dino eval_video_segmentation.py read_frame): the shorter side
    becomes `size`, the longer one keeps the aspect, floored to a multiple of 64 (of the patch where that does not
    divide 64 or the side is under 64 pixels); nothing is cropped."""
    long = int(max(h, w) * size / min(h, w))
    unit = 64 if 64 % patch == 0 and long >= 64 else patch
    long = max(size, long // unit * unit)
    return (size, long) if h <= w else (long, size)


@torch.no_grad()
def video_features(vit: nn.Module, video: VideoSource, spec: str, size: int | None, mean, std, device,
                   cache: FeatureCache, least: int = 0) -> tuple[list[VideoFeatures], int]:
    """Last-block patch features of every frame of every sequence (one cache entry for the whole set), and the
    shorter side they were computed at: `size`, or by default the frames' own (DINO reads DAVIS at its 480p) but
    no less than `least` (the training size)."""
    vit = require_vit(vit, "video propagation").to(device).eval()
    lengths = [len(s) for s in video.sequences]
    shapes = [seq.frame(0).shape[-2:] for seq in video.sequences]  # each sequence's first frame, decoded once
    if size is None:
        size = max(min(shapes[0]), least) // vit.patch_size * vit.patch_size
    check_size(size, vit.patch_size)
    grids = [video_grid(*shape, size, vit.patch_size) for shape in shapes]
    tokens = [n * (g[0] // vit.patch_size) * (g[1] // vit.patch_size) for n, g in zip(lengths, grids)]

    def compute():  # every frame's patch tokens, one row each, in one preallocated half-precision tensor
        store, at = torch.empty(sum(tokens), vit.embed_dim, dtype=torch.half), 0
        with ProgressLine(sum(lengths), f"patch features {spec}") as progress:
            for seq, grid in zip(video.sequences, grids):
                for t in range(0, len(seq), BATCH):
                    frames = [seq.frame(k).float().unsqueeze(0) / 255.0 for k in range(t, min(t + BATCH, len(seq)))]
                    x = torch.cat([F.interpolate(f, size=grid, mode="bicubic", align_corners=False, antialias=True)
                                   for f in frames]).clamp(0, 1)
                    x = normalise(x, mean, std).to(device)
                    patch, _ = vit.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)[0]
                    rows = patch.permute(0, 2, 3, 1).flatten(0, 2).half().cpu()
                    store[at : at + len(rows)], at = rows, at + len(rows)
                    progress.update(len(frames))
        return {"patch": store}, torch.tensor(lengths)

    stored, _ = cache.get(spec, "video", VideoIdentity(video, sum(lengths)), compute, kind="video-tokens", size=size,
                          mean=list(mean), std=list(std))
    out, start = [], 0
    for seq, n, grid, count in zip(video.sequences, lengths, grids, tokens):
        h, w = (g // vit.patch_size for g in grid)
        out.append(VideoFeatures(seq.name, stored["patch"][start : start + count].view(n, h, w, -1), seq))
        start += count
    return out, size


class VideoIdentity:
    """What the feature cache keys a video set on: its name, frame count and files."""

    def __init__(self, video: VideoSource, frames: int):
        self.name, self.files, self.n = video.name, video.files, frames
        self.generator = getattr(video, "generator", None)

    def __len__(self) -> int:
        return self.n
