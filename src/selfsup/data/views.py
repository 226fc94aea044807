"""Multi-crop views (DINO Sec. 3.1) with BYOL's augmentations (BYOL Table 6).

Split in two halves so the costly part runs batched on the training device:
- `MultiCrop` (loader side, per image): random resized crops and flips from the original image, plus the
  random parameters of the photometric augmentations. Each image draws from its own generator, seeded with
  (seed, epoch, image index), so a batch is the same whatever the number of ranks or loader workers, and a
  resumed run sees exactly the crops an uninterrupted one would.
- `Photometric` (device side, batched): colour jitter in random order, grayscale, Gaussian blur, solarize,
  normalisation.

Any number of channels: crops are uint8 from 8-bit images, float32 in [0, 1] from 16-bit or float ones (a batch
with both is float). Cropping, flips, brightness, contrast (towards each channel's mean when not RGB), blur and
solarize apply to every channel; saturation, hue and grayscale are RGB's and skip crops of other channel counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CropsConfig
from .channels import as_float

LUMA = (0.2989, 0.5870, 0.1140)  # BYOL Table 6 grayscale weights (ITU-R 601-2)


class Param(IntEnum):
    """The columns of a crop's photometric parameters (`Crops.params`): one float tensor, so that a batch's
    parameters are collated and moved to the device in one piece. Flags are 1.0 (on) or 0.0 (off)."""

    JITTER = 0  # flag: colour jitter
    BRIGHTNESS = 1  # jitter factors
    CONTRAST = 2
    SATURATION = 3
    HUE = 4  # a shift, in fractions of a turn
    ORDER = 5  # the jitter operations' order: a row of ORDERS
    GRAYSCALE = 6  # flag
    BLUR = 7  # flag
    BLUR_SIGMA = 8  # in pixels
    SOLARIZE = 9  # flag


N_PARAMS = len(Param)
JITTER_OPS = (Param.BRIGHTNESS, Param.CONTRAST, Param.SATURATION, Param.HUE)  # op codes 0-3 of ORDERS


@dataclass
class Crops:
    """One group of same-size crops, crop-major: crop c of sample b is row c * B + b."""

    images: torch.Tensor  # uint8 (or float in [0, 1]) [n * B, C, S, S] before `Photometric`, normalised float after
    params: torch.Tensor  # float [n * B, N_PARAMS], columns named by `Param`

    def to(self, device: torch.device) -> "Crops":
        return Crops(self.images.to(device, non_blocking=True), self.params.to(device, non_blocking=True))


@dataclass
class Views:
    """A batch of multi-crop views. `masks` (iBOT) is bool [n_global * B, h, w] over the global crops' patches."""

    global_crops: Crops
    local_crops: Crops | None
    labels: torch.Tensor
    index: torch.Tensor
    masks: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Views":
        return Views(
            self.global_crops.to(device),
            self.local_crops.to(device) if self.local_crops is not None else None,
            self.labels.to(device),
            self.index.to(device),
            self.masks.to(device, non_blocking=True) if self.masks is not None else None,
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.extra.items()},
        )


def crop_box(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]):
    """RandomResizedCrop's box: area fraction ~ U(scale), aspect ratio log-uniform in `ratio`; 10 tries,
    then the largest centred box within the ratio range."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    u = rng.random((10, 4))
    for a, r, ui, uj in u:
        target = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_r[0] + r * (log_r[1] - log_r[0]))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(ui * (h - ch + 1)), int(uj * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crop(img: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Crop [C, H, W] to `box`, resize to size x size, optionally flip; uint8 stays uint8, float stays float in
    [0, 1]. Bicubic, antialiased as PIL's: DINO, DINOv2 RandomResizedCrop(..., interpolation=BICUBIC) (main_dino.py,
    data/augmentations.py)."""
    i, j, h, w = box
    x = img[:, i : i + h, j : j + w].unsqueeze(0).float()
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    if img.dtype != torch.uint8:
        return x[0].clamp(0, 1)  # not in place: without a resize or flip, x is a view of `img`
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def photometric_params(rng: np.random.Generator, c: CropsConfig, p_blur: float, p_solarize: float) -> np.ndarray:
    """The random parameters of one crop's photometric augmentations (applied later by `Photometric`), indexed
    by `Param`. The draws' number and order fix every later crop of the image: u[9] is drawn but unused."""
    u = rng.random(10)
    p = np.empty(N_PARAMS, dtype=np.float32)
    p[Param.JITTER] = u[0] < c.color_jitter
    p[Param.BRIGHTNESS] = 1 + c.brightness * (2 * u[1] - 1)
    p[Param.CONTRAST] = 1 + c.contrast * (2 * u[2] - 1)
    p[Param.SATURATION] = 1 + c.saturation * (2 * u[3] - 1)
    p[Param.HUE] = c.hue * (2 * u[4] - 1)
    p[Param.ORDER] = rng.integers(24)  # one of the 4! orders of the jitter operations (BYOL: random order)
    p[Param.GRAYSCALE] = u[5] < c.grayscale
    p[Param.BLUR] = u[6] < p_blur
    p[Param.BLUR_SIGMA] = c.blur_sigma[0] + u[7] * (c.blur_sigma[1] - c.blur_sigma[0])
    p[Param.SOLARIZE] = u[8] < p_solarize
    return p


class MultiCrop:
    """Per image: `n_global` crops of `global_size` and `n_local` crops of `local_size`, with their flips and
    photometric parameters. `masking` (iBOT) may add patch masks for the global crops."""

    def __init__(self, cfg: CropsConfig, seed: int, masking: Callable | None = None):
        self.cfg, self.seed, self.masking = cfg, seed, masking

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def crops(self, img: torch.Tensor, rng: np.random.Generator):
        c = self.cfg
        _, h, w = img.shape
        out_g, par_g, out_l, par_l = [], [], [], []
        for k in range(c.n_global):
            flip = rng.random() < c.flip
            out_g.append(resized_crop(img, crop_box(rng, h, w, c.global_scale, c.ratio), c.global_size, flip))
            par_g.append(photometric_params(rng, c, c.blur[min(k, 1)], c.solarize[min(k, 1)]))
        for _ in range(c.n_local):
            flip = rng.random() < c.flip
            out_l.append(resized_crop(img, crop_box(rng, h, w, c.local_scale, c.ratio), c.local_size, flip))
            par_l.append(photometric_params(rng, c, c.blur[2], c.solarize[2]))
        return out_g, par_g, out_l, par_l

    def __call__(self, samples: list[tuple[torch.Tensor, int, int]], epoch: int) -> Views:
        """`samples` holds (image, label, dataset index) triples."""
        c = self.cfg
        gs, gp, ls, lp, masks = [], [], [], [], []
        for img, _, index in samples:
            rng = self.rng(epoch, index)
            g, pg, l, pl = self.crops(img, rng)
            gs.append(g), gp.append(pg), ls.append(l), lp.append(pl)
            if self.masking is not None and not hasattr(self.masking, "batch"):  # iBOT: a rule per image
                masks.append(self.masking(rng))
        # crop-major order: all samples' crop 0, then all samples' crop 1, ...
        g_img = _stack([gs[b][k] for k in range(c.n_global) for b in range(len(samples))])
        g_par = torch.from_numpy(np.stack([gp[b][k] for k in range(c.n_global) for b in range(len(samples))]))
        local = None
        if c.n_local:
            l_img = _stack([ls[b][k] for k in range(c.n_local) for b in range(len(samples))])
            l_par = torch.from_numpy(np.stack([lp[b][k] for k in range(c.n_local) for b in range(len(samples))]))
            local = Crops(l_img, l_par)
        m = None
        if masks:  # per sample [n_global, h, w] -> crop-major [n_global * B, h, w]
            m = torch.stack(masks, 1).flatten(0, 1)
        elif self.masking is not None:  # DINOv2: one rule over the batch's global crops (collate.py), seeded by its images
            m = self.masking.batch(np.random.default_rng([self.seed, epoch, *(int(s[2]) for s in samples)]),
                                   len(samples))
        labels = torch.tensor([s[1] for s in samples])
        index = torch.tensor([s[2] for s in samples])
        return Views(Crops(g_img, g_par), local, labels, index, m)


def _stack(crops: list[torch.Tensor]) -> torch.Tensor:
    """Crops as one tensor: uint8 when all are, else float in [0, 1]."""
    if all(c.dtype == torch.uint8 for c in crops):
        return torch.stack(crops)
    return torch.stack([as_float(c) for c in crops])


def synthetic_views(multicrop: MultiCrop, n: int, seed: int = 0, channels: int = 3) -> Views:
    """Multi-crop views of `n` random images 1.15x the global crop size, through the real `multicrop` (trial
    steps and benchmarks: no data read)."""
    g = torch.Generator().manual_seed(seed)
    side = int(multicrop.cfg.global_size * 1.15)
    samples = [(torch.randint(0, 256, (channels, side, side), generator=g, dtype=torch.uint8), 0, i)
               for i in range(n)]
    return multicrop(samples, 0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by `shift` (fraction of a turn), per image."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dsafe = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / dsafe, (maxc - g) / dsafe, (maxc - b) / dsafe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choose = lambda *c: torch.stack(c, 0).gather(0, i.unsqueeze(0))[0]  # noqa: E731
    return torch.stack([choose(v, q, p, p, t, v), choose(t, v, v, q, p, p), choose(p, p, t, v, v, q)], 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int = 0) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (pixels), reflect padding. `kernel` 0: each image's kernel
    reaches ceil(3 sigma), cut at its own radius so that its result does not depend on the rest of the batch (close
    to PIL's GaussianBlur(radius=sigma): dino utils.GaussianBlur); odd: that many taps whatever sigma (torchvision's
    GaussianBlur(kernel_size), as dinov2 data/transforms.py with 9). Either radius is cut to the crop's side - 1."""
    n, ch, hgt, wid = x.shape
    reach = kernel // 2 if kernel else int(math.ceil(3 * float(sigma.max())))
    radius = max(1, min(reach, min(hgt, wid) - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    own = torch.full_like(sigma, radius) if kernel else (3 * sigma).ceil().clamp(1, radius)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2) * (t.abs().view(1, -1) <= own.view(-1, 1))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # [n * ch, K]
    y = x.reshape(1, n * ch, hgt, wid)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * ch, 1, 1, -1), groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * ch, 1, -1, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


ORDERS = torch.tensor(list(__import__("itertools").permutations(range(4))))  # 24 x 4 indices into JITTER_OPS


class Photometric:
    """Applies the photometric augmentations whose parameters `MultiCrop` drew, batched on the device."""

    def __init__(self, cfg: CropsConfig, method_kernel: int = 0):
        """`method_kernel`: the blur kernel of crops.blur_kernel=auto, the method's (`Method.blur_kernel`)."""
        self.mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, -1, 1, 1)
        self.blur_kernel: int = method_kernel if cfg.blur_kernel == "auto" else int(cfg.blur_kernel)

    def jitter(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        order = ORDERS.to(x.device)[p[:, Param.ORDER].long()]
        rgb = x.shape[1] == 3
        for stage in range(4):
            for op, col in enumerate(JITTER_OPS):
                if not rgb and col in (Param.SATURATION, Param.HUE):
                    continue
                sel = torch.nonzero((order[:, stage] == op) & (p[:, Param.JITTER] > 0)).flatten()
                if sel.numel() == 0:
                    continue
                y, f = x[sel], p[sel, col]
                if col == Param.BRIGHTNESS:
                    y = y * f.view(-1, 1, 1, 1)
                elif col == Param.CONTRAST:  # blend with the mean gray level (not RGB: each channel's mean)
                    m = _gray(y).mean((1, 2, 3), keepdim=True) if rgb else y.mean((2, 3), keepdim=True)
                    y = m + (y - m) * f.view(-1, 1, 1, 1)
                elif col == Param.SATURATION:  # blend with the grayscale image
                    gr = _gray(y)
                    y = gr + (y - gr) * f.view(-1, 1, 1, 1)
                else:
                    y = _adjust_hue(y, f)
                x = x.index_copy(0, sel, y.clamp(0, 1))
        return x

    def __call__(self, crops: Crops) -> torch.Tensor:
        x = as_float(crops.images)
        p = crops.params.float()
        x = self.jitter(x, p)
        gray = p[:, Param.GRAYSCALE] > 0
        if gray.any() and x.shape[1] == 3:
            x = torch.where(gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        sel = torch.nonzero(p[:, Param.BLUR] > 0).flatten()
        if sel.numel():
            x = x.index_copy(0, sel, _blur(x[sel], p[sel, Param.BLUR_SIGMA], self.blur_kernel).clamp(0, 1))
        sol = p[:, Param.SOLARIZE] > 0
        if sol.any():  # PIL's solarize inverts pixels at or above 128
            x = torch.where(sol.view(-1, 1, 1, 1) & (x >= 128 / 255), 1.0 - x, x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def eval_short_side(size: int) -> int:
    """The shorter side the evaluation view resizes to before its centre crop: size * 256 / 224 (256 at 224)."""
    return size * 256 // 224


def eval_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(height, width, top, left) of the evaluation view of an h x w image: torchvision's Resize(size * 256 / 224)
    then CenterCrop(size), as DINO (eval_linear.py, eval_knn.py) and DINOv2 (data/transforms.py) evaluate: the
    shorter side to size * 8 / 7 (256 at 224), the longer one truncated by int() (transforms/functional.py
    _compute_resized_output_size), the crop offsets rounded (center_crop). Every image takes this path, the
    small ones too (the built-in digits): its shorter side is scaled up to size * 8 / 7, then cropped."""
    short = eval_short_side(size)
    if w <= h:
        nh, nw = int(short * h / w), short
    else:
        nh, nw = short, int(short * w / h)
    return nh, nw, int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))


def eval_resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images [N, C, H, W] in [0, 1] (one size) in their evaluation view [N, C, size, size], bicubic and
    antialiased as PIL's (see `eval_geometry`); not resized when already at the resized size, as torchvision."""
    nh, nw, top, left = eval_geometry(x.shape[-2], x.shape[-1], size)
    if (nh, nw) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x[..., top : top + size, left : left + size]


def eval_transform(img: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Evaluation view of one image [C, H, W] (uint8, or float in [0, 1]): `eval_resize_crop`, then normalised."""
    x = eval_resize_crop(as_float(img).unsqueeze(0), size)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s)[0]
