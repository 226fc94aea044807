"""Images that are not 8-bit RGB: multi-channel or multi-page TIFF, 16-bit PNG, `.npy` arrays; and the per-channel
statistics that normalise them.

Pixels keep their range. An image is a tensor [C, H, W]: uint8 for 8-bit data (as RGB images are), else float32
on a fixed scale: 16-bit values / 65535, float values as they are (expected in [0, 1]; the views clip to it). No
image is rescaled by its own minimum or maximum.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from ..config import IMAGENET_MEAN, IMAGENET_STD, Config
from ..core.errors import UserError

log = logging.getLogger("selfsup")
TIFF_SUFFIXES = (".tif", ".tiff")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # Pillow's 16-bit, 32-bit integer and float modes
STATS_SAMPLE = 256  # images read to compute auto channel statistics


def tifffile():
    """The tifffile module, an optional install."""
    try:
        import tifffile as module
    except ImportError:
        raise UserError("reading multi-channel, multi-page or 16-bit TIFF needs tifffile: "
                        "pip install 'selfsup[tiff]'") from None
    return module


def read_tiff(path: Path) -> np.ndarray:
    """A TIFF's first series as [C, H, W]: its pages (multi-page) or samples (multi-channel) are the channels."""
    with tifffile().TiffFile(path) as tif:
        series = tif.series[0]
        a, axes = series.asarray(), series.axes
    drop = tuple(i for i, ax in enumerate(axes) if ax not in "YX" and a.shape[i] == 1)
    a, axes = a.squeeze(drop), "".join(ax for i, ax in enumerate(axes) if i not in drop)
    extra = [i for i, ax in enumerate(axes) if ax not in "YX"]
    if len(extra) > 1 or "Y" not in axes or "X" not in axes:
        raise UserError(f"{path}: TIFF axes {series.axes} of shape {series.shape} (expected Y, X and at most one "
                        "channel axis: pages or samples)")
    return np.moveaxis(a, extra[0], 0) if extra else a[None]


def tiff_size(path: Path) -> tuple[int, int]:
    """A TIFF's height and width, from its header."""
    with tifffile().TiffFile(path) as tif:
        series = tif.series[0]
        return series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]


def read_npy(path: Path, channels: int) -> np.ndarray:
    """A `.npy` array as [C, H, W]: a 2-D array is one channel; a 3-D one is [C, H, W] (as rasterio reads bands) or
    [H, W, C] (as numpy holds images), whichever has `channels` on its first or last axis."""
    a = np.load(path, allow_pickle=False)
    if a.ndim == 2:
        return a[None]
    first, last = a.ndim == 3 and a.shape[0] == channels, a.ndim == 3 and a.shape[-1] == channels
    if first != last:
        return a if first else np.moveaxis(a, -1, 0)
    why = "ambiguous: both its first and last axis" if first else "neither its first nor its last axis"
    raise UserError(f"{path}: an array of shape {tuple(a.shape)}, {why} of length backbone.in_chans = {channels} "
                    f"(expected [{channels}, H, W] or [H, W, {channels}]; [H, W] is one channel)")


def read_pil(im: Image.Image) -> np.ndarray:
    """A Pillow image's own channels as [C, H, W]: L 1, LA 2, RGB 3, RGBA and CMYK 4 (raw, not composited); a
    palette becomes RGB(A); 16-bit (I;16, and I as PNG gives it) one channel."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    a = np.asarray(im)
    if im.mode == "I":  # 32-bit integers: Pillow's mode for some 16-bit PNGs
        a = np.clip(a, 0, 65535).astype(np.uint16)
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


def read_array(path: Path | BinaryIO, channels: int) -> np.ndarray:
    """Any image file (or a Pillow-readable image's bytes) as [C, H, W] with its own channels and dtype."""
    suffix = path.suffix.lower() if isinstance(path, Path) else ""
    if suffix == ".npy":
        return read_npy(path, channels)
    if suffix in TIFF_SUFFIXES:
        return read_tiff(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            im.load()
            return read_pil(im)


def to_tensor(a: np.ndarray, where: str) -> torch.Tensor:
    """uint8 stays uint8; uint16 becomes float32 value / 65535; float becomes float32 as it is."""
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if a.dtype == np.uint16:
        return torch.from_numpy(a.astype(np.float32) / 65535.0)
    if np.issubdtype(a.dtype, np.floating):
        return torch.from_numpy(a.astype(np.float32))
    raise UserError(f"{where}: pixels of type {a.dtype} (expected uint8, uint16 or float in [0, 1])")


def fit_channels(img: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    """`img` [C, H, W] with `channels` channels: as it is, or one channel copied to three (grayscale as RGB)."""
    if img.shape[-3] == channels:
        return img
    if img.shape[-3] == 1 and channels == 3:
        return img.expand(*img.shape[:-3], 3, *img.shape[-2:])
    raise UserError(f"{where}: {img.shape[-3]} channel(s), but the backbone takes {channels} "
                    f"(backbone.in_chans={img.shape[-3]} for these images)")


def as_float(img: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as float32: uint8 / 255, float as it is."""
    return img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """An image as uint8 for what shows or re-encodes 8-bit pictures: float [0, 1] x 255, rounded (a fixed scale)."""
    return img if img.dtype == torch.uint8 else (img.clamp(0, 1) * 255).round_().to(torch.uint8)


def channel_stats(source, n: int = STATS_SAMPLE) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels of up to `n` images spread over `source`, in [0, 1]
    units (`as_float`), to 6 significant digits."""
    picks = np.unique(np.linspace(0, len(source) - 1, min(n, len(source))).round().astype(int))
    total = squares = None
    count = 0
    for i in picks:
        x = as_float(source[int(i)][0]).double().flatten(1)
        total = x.sum(1) if total is None else total + x.sum(1)
        squares = (x * x).sum(1) if squares is None else squares + (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    if (std == 0).any():
        raise UserError(f"{source.name}: channel(s) {torch.nonzero(std == 0).flatten().tolist()} constant over "
                        f"{len(picks)} sampled images (give crops.std explicitly)")
    return tuple(float(f"{v:.6g}") for v in mean.tolist()), tuple(float(f"{v:.6g}") for v in std.tolist())


def fit_to_source(cfg: Config, source) -> None:
    """Prepare a training run for its data: `source` yields backbone.in_chans channels (its first image is read
    to check), and crops.mean / crops.std that are auto (or ImageNet's RGB defaults with another channel count)
    are computed from a sample of it, in place, so that the saved config.yaml holds them."""
    n, c = cfg.backbone.in_chans, cfg.crops
    source.channels = n
    if n != 3:
        source[0]  # a UserError naming the file when its channels differ
    auto = {k for k, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD))
            if getattr(c, k) == "auto" or (n != 3 and getattr(c, k) == default)}
    if not auto:
        return
    mean, std = channel_stats(source)
    c.mean, c.std = mean if "mean" in auto else c.mean, std if "std" in auto else c.std
    log.info("crops.mean %s, crops.std %s: computed from %d images of %s", list(c.mean), list(c.std),
             min(STATS_SAMPLE, len(source)), source.name)
