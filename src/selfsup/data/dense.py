"""Dense-label sets read from the folder layouts of the public datasets (DINO/DINOv2 dense evaluations).

- segmentation: PASCAL VOC 2012 or ADE20K (SceneParsing, ADEChallengeData2016), told apart by their folders;
- depth: NYU-style pairs of an RGB image and a 16-bit PNG of depth values;
- video: DAVIS 2017 (semi-supervised: frames with per-object masks).

Opening a set lists and pairs its files, and every bad input (a missing list entry, an image with no label file, a
mask of the wrong size or mode) raises a one-line `UserError` naming the file; pixels are read per item.
"""
from __future__ import annotations

import csv
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import UserError
from .channels import to_uint8
from .sources import IMAGE_SUFFIXES, decode

log = logging.getLogger("selfsup")

IGNORE = 255  # label value that is ignored: VOC's object borders, ADE20K's unlabelled pixels
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
ADE_N_CLASSES = 150
DEPTH_SCALE = 1000.0  # NYU-style PNGs store millimetres
MAX_DEPTH_SCAN = 2000  # splits smaller than this get max_depth from their own values ...
NYU_MAX_DEPTH = 10.0  # ... larger ones NYU's cap (the max_depth of DINOv2's and mmdepth's NYU configs)
EXPECTED = {
    "voc": "JPEGImages/ + SegmentationClass/ + ImageSets/Segmentation/ (VOC 2012)",
    "ade20k": "images/ + annotations/ (ADE20K, ADEChallengeData2016)",
    "depth": "train/ or test/ with <name>.jpg + <name>_depth.png pairs, or rgb/ + depth/ (NYU-style depth)",
    "davis": "JPEGImages/480p/ + Annotations/480p/ (DAVIS 2017)",
}


@dataclass
class DenseItem:
    image: torch.Tensor  # uint8 [3, H, W] (grayscale -> 3 channels, RGBA -> RGB)
    mask: torch.Tensor | None  # int64 [H, W]: class per pixel, 0 = background, IGNORE = ignored
    depth: torch.Tensor | None  # float32 [H, W] in metres, 0 = no measurement


class DenseSource:
    """Images with a class mask and/or a depth map per pixel."""

    name: str
    classes: list[str]  # class names by id; classes[0] is the background
    has_masks: bool
    has_depth: bool
    max_depth: float | None  # the largest depth of the set (for depth bins); None without depth
    files: list[Path] | None  # the image files (the feature cache's identity); None for in-memory sets

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> DenseItem:
        raise NotImplementedError


class VideoSequence:
    """Frames of one video, with an object-id mask on the annotated ones."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def frame(self, t: int) -> torch.Tensor:
        """uint8 [3, H, W]."""
        raise NotImplementedError

    def mask(self, t: int) -> torch.Tensor | None:
        """uint8 [H, W]: object id per pixel (0 = background); None where frame t has no annotation."""
        raise NotImplementedError


class VideoSource:
    name: str
    sequences: list[VideoSequence]
    files: list[Path] | None  # every frame file (the feature cache's identity); None for in-memory sets


# ---------------------------------------------------------------------------------------------- layouts


def _find(root: Path) -> tuple[str, Path] | None:
    """The layout of `root` and the folder that holds it (VOC may sit in VOCdevkit/VOC2012, ADE20K in
    ADEChallengeData2016, DAVIS in DAVIS, as the archives unpack)."""
    for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir():
            return "voc", base
    for base in (root, root / "ADEChallengeData2016"):
        if (base / "images").is_dir() and (base / "annotations").is_dir():
            return "ade20k", base
    for base in (root, root / "DAVIS"):
        if (base / "JPEGImages" / "480p").is_dir() and (base / "Annotations" / "480p").is_dir():
            return "davis", base
    for split in ("train", "test"):
        d = root / split
        if d.is_dir() and (((d / "rgb").is_dir() and (d / "depth").is_dir()) or next(d.glob("*_depth.png"), None)):
            return "depth", root
    return None


def detect_layout(root: Path) -> str | None:
    """'voc', 'ade20k', 'depth' or 'davis' (see the module docstring), None for a folder in none of them."""
    found = _find(Path(root))
    return found[0] if found else None


def _open(root: Path, kinds: tuple[str, ...]) -> tuple[str, Path]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    found = _find(root)
    if found is None or found[0] not in kinds:
        names = {"voc": "VOC", "ade20k": "ADE20K", "depth": "depth", "davis": "DAVIS"}
        what = " or ".join(names[k] for k in kinds)
        seen = f"; it has the {names[found[0]]} layout" if found else ""
        raise UserError(f"{root}: not a {what} folder (expected {'; or '.join(EXPECTED[k] for k in kinds)}){seen}")
    return found


def _split(split: str, allowed: tuple[str, ...] = ("train", "test")) -> None:
    if split not in allowed:
        raise UserError(f"split {split!r}: expected {' or '.join(map(repr, allowed))}")


# ---------------------------------------------------------------------------------------------- pixels


def _image(path: Path) -> torch.Tensor:
    try:
        return to_uint8(decode(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _read(path: Path, modes: tuple[str, ...], expected: str) -> np.ndarray:
    """A single-channel PNG's values as stored (a palette image's indices, not its colours)."""
    try:
        with Image.open(path) as im:
            if im.mode not in modes:
                raise UserError(f"{path}: a {im.mode} image; expected {expected}")
            return np.array(im)
    except OSError as e:
        raise UserError(f"{path}: not a readable PNG ({type(e).__name__}: {e})") from None


def _same_size(label: np.ndarray, path: Path, image: torch.Tensor, image_path: Path) -> None:
    if label.shape != tuple(image.shape[1:]):
        h, w = label.shape[:2]
        raise UserError(f"{path}: {w}x{h} pixels, but its image {image_path.name} is "
                        f"{image.shape[2]}x{image.shape[1]}; expected the same size")


def _class_ids(path: Path, top: int) -> np.ndarray:
    return _read(path, ("P", "L"), f"a palette (P) or 8-bit grayscale (L) PNG of class ids 0..{top}")


def voc_mask(path: Path) -> np.ndarray:
    """VOC 2012 SegmentationClass: the palette index is the class id (0..20), 255 marks object borders (ignored)."""
    m = _class_ids(path, len(VOC_CLASSES) - 1)
    bad = (m >= len(VOC_CLASSES)) & (m != IGNORE)
    if bad.any():
        raise UserError(f"{path}: class id {int(m[bad][0])}; expected VOC ids 0..{len(VOC_CLASSES) - 1} or "
                        f"{IGNORE} (border)")
    return m.astype(np.int64)


def ade_mask(path: Path) -> np.ndarray:
    """ADE20K SceneParsing annotation: 0 = 'other' (unlabelled) becomes IGNORE, 1..150 stay the class ids."""
    m = _class_ids(path, ADE_N_CLASSES)
    if (m > ADE_N_CLASSES).any():
        raise UserError(f"{path}: class id {int(m.max())}; expected ADE20K ids 0..{ADE_N_CLASSES}")
    out = m.astype(np.int64)
    out[m == 0] = IGNORE
    return out


def read_depth(path: Path, scale: float) -> np.ndarray:
    """Depth in metres: the stored value / scale (NYU-style PNGs: millimetres), 0 = no measurement."""
    d = _read(path, ("I;16", "I;16B", "I", "L"), "a 16-bit (or 8-bit) single-channel PNG of depth values")
    return d.astype(np.float32) / np.float32(scale)


# ---------------------------------------------------------------------------------------------- segmentation


class SegmentationFolder(DenseSource):
    """Images paired with class masks, read per item by `read_mask`."""

    def __init__(self, name: str, classes: list[str], images: list[Path], masks: list[Path],
                 read_mask: Callable[[Path], np.ndarray]):
        self.name, self.classes, self.files, self.masks, self.read_mask = name, classes, images, masks, read_mask
        self.has_masks, self.has_depth, self.max_depth = True, False, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> DenseItem:
        image, mask = _image(self.files[i]), self.read_mask(self.masks[i])
        _same_size(mask, self.masks[i], image, self.files[i])
        return DenseItem(image, torch.from_numpy(mask), None)


def open_segmentation(root: Path, split: str) -> DenseSource:
    """A VOC 2012 or ADE20K folder (auto-detected); split 'train', or 'test' = VOC's val list, ADE's validation/.

    VOC: `ImageSets/Segmentation/{train,val}.txt` lists ids of `JPEGImages/<id>.jpg` + `SegmentationClass/<id>.png`;
    the 21 VOC classes, 255 = border (IGNORE).
    ADE20K: `images/<split>/<stem>.jpg` + `annotations/<split>/<stem>.png`. Unlike mmsegmentation's
    `reduce_zero_label` (0 -> 255, k -> k-1), ids keep their value: 0 ('other') -> IGNORE, 1..150 stay, so that
    classes[0] = 'background' (never present, as nothing is labelled 0) and classes[k] is ADE class k: its name from
    `objectInfo150.txt` / `objectInfo150.csv` at the root when there, else f'class{k}'.
    """
    _split(split)
    kind, base = _open(root, ("voc", "ade20k"))
    return _voc(base, split) if kind == "voc" else _ade(base, split)


def _listing(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _voc(base: Path, split: str) -> SegmentationFolder:
    listed = base / "ImageSets" / "Segmentation" / ("train.txt" if split == "train" else "val.txt")
    if not listed.is_file():
        raise UserError(f"{listed}: missing (expected VOC's list of {listed.stem} image ids, one per line)")
    ids = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"{listed}: no image ids (expected one id per line)")
    jpegs, pngs = _listing(base / "JPEGImages"), _listing(base / "SegmentationClass")
    for i in ids:
        for name, have, folder in ((f"{i}.jpg", jpegs, "JPEGImages"), (f"{i}.png", pngs, "SegmentationClass")):
            if name not in have:
                raise UserError(f"{base / folder / name}: missing (id {i!r} is listed in {listed})")
    return SegmentationFolder(f"voc:{split}", list(VOC_CLASSES), [base / "JPEGImages" / f"{i}.jpg" for i in ids],
                              [base / "SegmentationClass" / f"{i}.png" for i in ids], voc_mask)


def _ade(base: Path, split: str) -> SegmentationFolder:
    sub = "training" if split == "train" else "validation"
    image_dir, mask_dir = base / "images" / sub, base / "annotations" / sub
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: missing (expected ADE20K's {sub} {folder.parent.name})")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{image_dir}: no images (expected ADE20K's {sub} .jpg files)")
    have = _listing(mask_dir)
    for p in images:
        if f"{p.stem}.png" not in have:
            raise UserError(f"{p}: no annotation (expected {mask_dir / (p.stem + '.png')})")
    return SegmentationFolder(f"ade20k:{split}", ["background"] + ade_names(base), images,
                              [mask_dir / f"{p.stem}.png" for p in images], ade_mask)


def ade_names(base: Path) -> list[str]:
    """The 150 ADE20K class names by id (1..150): the first synonym of each row's last field ('building, edifice'
    -> 'building') of objectInfo150.txt (tab-separated, shipped in ADEChallengeData2016) or objectInfo150.csv (the
    SceneParsing repository's); 'class1'...'class150' without either, or (with a warning) when it does not list
    every id once."""
    for file, delimiter in (("objectInfo150.txt", "\t"), ("objectInfo150.csv", ",")):
        path = base / file
        if path.is_file():
            rows = csv.reader(path.read_text(encoding="utf-8", errors="replace").splitlines(), delimiter=delimiter)
            names = {int(r[0]): r[-1].split(";")[0].split(",")[0].strip() for r in rows if r and r[0].isdigit()}
            if sorted(names) == list(range(1, ADE_N_CLASSES + 1)):
                return [names[k] for k in range(1, ADE_N_CLASSES + 1)]
            log.warning("%s: expected a row for each class id 1..%d; classes are named class1...", path,
                        ADE_N_CLASSES)
            break
    return [f"class{k}" for k in range(1, ADE_N_CLASSES + 1)]


# ---------------------------------------------------------------------------------------------- depth


class DepthFolder(DenseSource):
    """RGB images paired with depth PNGs (value / scale = metres, 0 = no measurement)."""

    def __init__(self, name: str, images: list[Path], depths: list[Path], scale: float):
        self.name, self.files, self.depths, self.scale = name, images, depths, scale
        self.classes, self.has_masks, self.has_depth = [], False, True

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> DenseItem:
        image, depth = _image(self.files[i]), read_depth(self.depths[i], self.scale)
        _same_size(depth, self.depths[i], image, self.files[i])
        return DenseItem(image, None, torch.from_numpy(depth))

    @functools.cached_property
    def max_depth(self) -> float:
        """The largest valid depth of the split when it has fewer than MAX_DEPTH_SCAN items (read on first use),
        else NYU_MAX_DEPTH: reading every map of a large set just for its maximum is not worth it."""
        if len(self) >= MAX_DEPTH_SCAN:
            return NYU_MAX_DEPTH
        top = max(float(read_depth(p, self.scale).max()) for p in self.depths)
        if top <= 0:
            raise UserError(f"{self.files[0].parent}: every depth value is 0 (no measurement); expected depth maps")
        return top


def open_depth(root: Path, split: str) -> DenseSource:
    """NYU-style depth pairs in `root/<split>/` (split 'train' or 'test'): `<name>.jpg|png` + `<name>_depth.png`,
    or `rgb/<name>.*` + `depth/<name>.png`. Depth PNGs are 16-bit (or 8-bit) single-channel; metres = value / scale,
    scale 1000 (millimetres) unless `root/depth_scale.txt` holds another number; 0 = no measurement."""
    _split(split)
    _, root = _open(root, ("depth",))
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"{folder}: missing (expected the {split} split's images and depth PNGs)")
    if (folder / "rgb").is_dir() and (folder / "depth").is_dir():
        images = sorted(p for p in (folder / "rgb").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        depths = [folder / "depth" / f"{p.stem}.png" for p in images]
    else:
        images = sorted(p for p in folder.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_depth"))
        depths = [folder / f"{p.stem}_depth.png" for p in images]
    if not images:
        raise UserError(f"{folder}: no images (expected {EXPECTED['depth']})")
    for p, d in zip(images, depths):
        if not d.is_file():
            raise UserError(f"{p}: no depth map (expected {d})")
    return DepthFolder(f"depth:{split}", images, depths, _depth_scale(root))


def _depth_scale(root: Path) -> float:
    path = root / "depth_scale.txt"
    if not path.is_file():
        return DEPTH_SCALE
    text = path.read_text().strip()
    try:
        scale = float(text)
    except ValueError:
        scale = 0.0
    if not scale > 0 or scale == float("inf"):
        raise UserError(f"{path}: {text!r}; expected one positive number (stored depth value per metre)")
    return scale


# ---------------------------------------------------------------------------------------------- video


class DavisSequence(VideoSequence):
    """A DAVIS sequence: frames, and the annotation PNG of the same stem where there is one."""

    def __init__(self, name: str, frames: list[Path], masks: list[Path | None]):
        self.name, self.frames, self.masks = name, frames, masks

    def __len__(self) -> int:
        return len(self.frames)

    def frame(self, t: int) -> torch.Tensor:
        return _image(self.frames[t])

    def mask(self, t: int) -> torch.Tensor | None:
        """DAVIS 2017 annotation: the palette index is the object id, 0 = background; 255 (void) is counted as
        background."""
        path = self.masks[t]
        if path is None:
            return None
        m = _read(path, ("P", "L"), "a palette (P) or 8-bit grayscale (L) PNG of object ids").astype(np.uint8)
        m[m == 255] = 0
        try:
            with Image.open(self.frames[t]) as im:
                w, h = im.size  # the header only: the frame itself is decoded by frame(t)
        except OSError as e:
            raise UserError(f"{self.frames[t]}: not a readable image ({type(e).__name__}: {e})") from None
        if m.shape != (h, w):
            raise UserError(f"{path}: {m.shape[1]}x{m.shape[0]} pixels, but its frame {self.frames[t].name} is "
                            f"{w}x{h}; expected the same size")
        return torch.from_numpy(m)


class DavisVideos(VideoSource):
    def __init__(self, name: str, sequences: list[DavisSequence]):
        self.name, self.sequences = name, sequences
        self.files = [f for s in sequences for f in s.frames]


def open_video(root: Path, split: str = "val") -> VideoSource:
    """DAVIS 2017 at 480p: the sequences of `ImageSets/2017/{train,val}.txt` ('test' = val; every sequence folder,
    sorted, when the list is missing), frames `JPEGImages/480p/<seq>/*.jpg` sorted by name, annotation of a frame =
    `Annotations/480p/<seq>/<frame stem>.png`. Every sequence's first frame must be annotated (the semi-supervised
    protocol propagates it)."""
    _split(split, ("train", "val", "test"))
    _, base = _open(root, ("davis",))
    frame_dir, mask_dir = base / "JPEGImages" / "480p", base / "Annotations" / "480p"
    listed = base / "ImageSets" / "2017" / ("train.txt" if split == "train" else "val.txt")
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        where = f"listed in {listed}"
    else:
        names = sorted(p.name for p in frame_dir.iterdir() if p.is_dir())
        where = f"a folder of {frame_dir}"
    if not names:
        raise UserError(f"{listed if listed.is_file() else frame_dir}: no sequences (expected {EXPECTED['davis']})")
    sequences = []
    for name in names:
        folder = frame_dir / name
        if not folder.is_dir():
            raise UserError(f"{folder}: missing (sequence {name!r} is {where})")
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise UserError(f"{folder}: no frames (expected DAVIS's 00000.jpg, 00001.jpg, ...)")
        have = _listing(mask_dir / name)
        masks = [mask_dir / name / f"{f.stem}.png" if f"{f.stem}.png" in have else None for f in frames]
        if masks[0] is None:
            raise UserError(f"{mask_dir / name / (frames[0].stem + '.png')}: missing (the first frame's objects are "
                            "what is propagated)")
        sequences.append(DavisSequence(name, frames, masks))
    return DavisVideos(f"davis2017:{split}", sequences)
