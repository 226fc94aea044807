"""Images to look at: files and folders given on the command line, or a few from a `--data` source."""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import UserError
from ..data.builtin import open_source
from ..data.channels import to_uint8
from ..data.sources import decode, list_images

# scikit-image sample photos with one clear subject, in the order they are picked
SKIMAGE_PICKS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle_left", "horse", "camera", "hubble_deep_field")


def from_files(paths: list[str]) -> list[tuple[str, torch.Tensor]]:
    """(name, uint8 [3, H, W]) for each image file, and for every image inside each folder."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = list_images(p)
            if not files:
                raise UserError(f"{p}: no image files in this folder")
        elif p.is_file():
            files = [p]
        else:
            raise UserError(f"{p}: no such file or directory")
        for f in files:
            try:
                out.append((f.stem, to_uint8(decode(f))))
            except Exception as e:  # noqa: BLE001 - any decoder failure means this file is unusable
                raise UserError(f"{f}: not a readable image ({type(e).__name__})") from None
    return out


def from_source(spec: str, n: int) -> list[tuple[str, torch.Tensor]]:
    """`n` images of a source: one per class in turn from the test split of labelled data; for scikit-image's
    photos, the ones with a clear subject first."""
    src = open_source(spec)
    if src.labelled:
        src = open_source(spec, "test")
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(src.labels().tolist()):
            by_class.setdefault(label, []).append(i)
        rounds = itertools.zip_longest(*(by_class[c] for c in sorted(by_class)))
        order = [i for r in rounds for i in r if i is not None]
    elif spec == "skimage":
        names = [f.stem for f in src.files]
        order = [names.index(s) for s in SKIMAGE_PICKS if s in names] + [i for i, s in enumerate(names)
                                                                          if s not in SKIMAGE_PICKS]
    else:
        order = list(range(len(src)))
    picked = []
    for i in order[:n]:
        img, label = src[i]
        name = getattr(src, "files", None)
        picked.append((name[i].stem if name else f"{spec}-{i}" + (f"-{src.classes[label]}" if label >= 0 else ""),
                       to_uint8(img)))
    return picked


def viz_images(paths: list[str], data: str | None, n: int) -> list[tuple[str, torch.Tensor]]:
    if not paths and not data:
        raise UserError("no images: give image files or folders, or --data (e.g. --data skimage, --data mnist5k)")
    return from_files(paths) + (from_source(data, n) if data else [])


def prepare(img: torch.Tensor, size: int, patch: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised input [3, h, w], display image [3, h, w] in 0..1): the shorter side resized to `size`, the
    aspect ratio kept, then centre-cropped to whole patches (DINO visualize_attention.py)."""
    x = img.float().unsqueeze(0) / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(patch, round(h * scale)), max(patch, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    ch, cw = nh - nh % patch, nw - nw % patch
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[..., top : top + ch, left : left + cw]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s)[0], x[0]
