"""Where images come from: built-in labelled sets in memory, or a folder of image files.

A source yields `(tensor [C, H, W], label)`; the label is -1 where none is known. C is the source's `channels`,
the backbone's backbone.in_chans: 3 (RGB) unless whoever reads the source sets it. 8-bit images are uint8 (with 3
channels any mode becomes RGB and grayscale 3 channels, as always); 16-bit and float images, multi-page TIFFs and
`.npy` arrays keep their channels and range as float32 (`channels.py`). Unreadable files are skipped and counted,
never fatal unless nothing usable is left.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile

from ..core.errors import UserError
from .channels import TIFF_SUFFIXES, WIDE_MODES, fit_channels, read_array, read_pil, tiff_size, to_tensor

log = logging.getLogger("selfsup")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".npy"}
ImageFile.LOAD_TRUNCATED_IMAGES = True  # a truncated JPEG still gives the part that was written


class Source(torch.utils.data.Dataset):
    """A list of images with optional labels."""

    name: str
    classes: list[str] | None = None
    channels: int = 3  # of each image: backbone.in_chans, set by the trainer and the evaluation

    def labels(self) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    @property
    def labelled(self) -> bool:
        return self.classes is not None


class TensorSource(Source):
    """Images held in memory as one uint8 tensor [N, C, H, W] (the built-in sets)."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor | None, classes: list[str] | None):
        self.name, self.images, self._labels, self.classes = name, images, labels, classes

    def labels(self) -> torch.Tensor:
        return self._labels if self._labels is not None else torch.full((len(self),), -1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = fit_channels(self.images[i], self.channels, self.name)
        return img, int(self._labels[i]) if self._labels is not None else -1

    def subset(self, index: torch.Tensor, name: str) -> "TensorSource":
        labels = self._labels[index] if self._labels is not None else None
        sub = TensorSource(name, self.images[index], labels, self.classes)
        sub.channels = self.channels
        return sub


def decode(path: Path | BinaryIO, channels: int = 3) -> torch.Tensor:
    """Decode an image file (or its bytes) to [channels, H, W]. With 3 channels an 8-bit image becomes uint8 RGB
    whatever its mode (palette, CMYK, alpha on white), as always; any other image (16-bit or float, multi-page TIFF,
    `.npy`, or any file for another channel count) keeps its own channels and range (`channels.py`)."""
    if channels == 3 and not (isinstance(path, Path) and path.suffix.lower() == ".npy"):
        img = _decode_pil(path)
        if img is not None:
            return img
    return fit_channels(to_tensor(read_array(path, channels), str(path)), channels, str(path))


def _decode_pil(path: Path | BinaryIO) -> torch.Tensor | None:
    """3 channels through Pillow: an 8-bit image as uint8 RGB, a 16-bit one (PNG) as float with its range kept;
    None for a TIFF that is tifffile's (multi-page, more than 8 bits a sample, or one Pillow cannot open)."""
    tiff = isinstance(path, Path) and path.suffix.lower() in TIFF_SUFFIXES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(path)
        except Exception:  # noqa: BLE001 - re-raised unless tifffile may read it
            if tiff:
                return None
            raise
        with im:
            if tiff and (max(np.atleast_1d(im.tag_v2.get(258, 8))) > 8 or getattr(im, "n_frames", 1) > 1):
                return None
            im.load()
            if im.mode in WIDE_MODES:  # no rescaling: value / 65535
                return fit_channels(to_tensor(read_pil(im), str(path)), 3, str(path))
            if im.mode in ("P", "PA", "LA", "RGBA"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            rgb = im.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class Skipped:
    """Files that could not be used, with the reason of the first few."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, path: Path, why: str) -> None:
        self.count += 1
        if len(self.first) < 3:
            self.first.append(f"{path.name} ({why})")

    def line(self, where: str) -> str:
        return f"{where}: skipped {self.count} unusable file(s), e.g. " + ", ".join(self.first)


_checked: dict[Path, tuple[list[Path], Skipped]] = {}  # folder -> its usable files, checked once per process


def usable(root: Path, files: list[Path]) -> list[Path]:
    """The files whose header reads as an image of at least one pixel. The others are counted in one log
    line per folder and process (however many splits or sources are opened on it)."""
    if root not in _checked:
        skipped, good = Skipped(), []
        for f in files:
            why = _check_header(f)
            if why:
                skipped.add(f, why)
            else:
                good.append(f)
        if skipped.count:
            log.warning(skipped.line(str(root)))
        _checked[root] = good, skipped
    known = set(_checked[root][0])
    return [f for f in files if f in known]


def unusable(root: Path) -> Skipped:
    """What `usable` left out of a folder (a copy, to count on)."""
    skipped = _checked[root][1] if root in _checked else Skipped()
    return Skipped(skipped.count, list(skipped.first))


class EncodedSource(Source):
    """Images stored encoded (files, tar shards): `read(k)` decodes item k. One that fails is replaced by
    the next good one and counted in `skipped` (which may start with the files left out up front); the first
    such failure in a process is logged."""

    root: Path
    _labels: torch.Tensor | None = None
    replaced = 0  # decode failures in this process

    def read(self, k: int) -> torch.Tensor:
        raise NotImplementedError

    def where(self, k: int) -> str:
        """Item k's name, for the log."""
        raise NotImplementedError

    def labels(self) -> torch.Tensor:
        return self._labels if self._labels is not None else torch.full((len(self),), -1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        for j in range(n):
            k = (i + j) % n
            try:
                img = self.read(k)
            except UserError:  # not a broken file: images the run cannot take (channels, layout, tifffile)
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure means this file is unusable
                self.skipped.add(Path(self.where(k)), type(e).__name__)
                self.replaced += 1
                if self.replaced == 1:
                    log.warning("%s: %s unusable (%s), replaced by the next good image; further failures are "
                                "counted silently", self.root, Path(self.where(k)).name, type(e).__name__)
                continue
            return img, int(self._labels[k]) if self._labels is not None else -1
        raise UserError(f"{self.root}: no image could be decoded")


class FolderSource(EncodedSource):
    """Image files under `root` (checked by `usable`); the first-level subfolder is the class when there
    are classes."""

    def __init__(self, root: Path, files: list[Path], classes: list[str] | None, name: str | None = None):
        if not files:
            raise UserError(f"{root}: no usable image (expected {_suffixes()} files that open as images)")
        self.root, self.classes, self.files = root, classes, files
        self.name = name or root.name
        self.skipped = unusable(root)
        self._labels = torch.tensor([self._label_of(f) for f in files]) if classes else None

    def _label_of(self, f: Path) -> int:
        return self.classes.index(f.relative_to(self.root).parts[0])

    def __len__(self) -> int:
        return len(self.files)

    def read(self, k: int) -> torch.Tensor:
        return decode(self.files[k], self.channels)

    def where(self, k: int) -> str:
        return str(self.files[k])


def _suffixes() -> str:
    return "/".join(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES))


def image_size(f: Path) -> tuple[int, int]:
    """(height, width) from a file's header: Pillow's, tifffile's for a TIFF Pillow cannot open, or a `.npy`
    array's (a 3-D one without the shorter of its first and last axes, the channels)."""
    if f.suffix.lower() == ".npy":
        shape = np.load(f, mmap_mode="r", allow_pickle=False).shape
        if len(shape) not in (2, 3):
            raise ValueError(f"an array of {len(shape)} dimensions")
        return shape if len(shape) == 2 else shape[1:] if shape[0] <= shape[-1] else shape[:-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(f) as im:
                return im.size[::-1]
        except Exception:  # noqa: BLE001 - a TIFF Pillow cannot open may be tifffile's
            if f.suffix.lower() not in TIFF_SUFFIXES:
                raise
    return tiff_size(f)


def _check_header(f: Path) -> str | None:
    try:
        if f.stat().st_size == 0:
            return "empty file"
        return None if min(image_size(f)) > 0 else "no pixels"
    except UserError:  # tifffile missing
        raise
    except Exception as e:  # noqa: BLE001
        return type(e).__name__


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def folder_classes(root: Path, files: list[Path]) -> list[str] | None:
    """Classes from first-level subfolders, when every image lies in one."""
    tops = {f.relative_to(root).parts[0] for f in files}
    if any(len(f.relative_to(root).parts) < 2 for f in files):
        return None
    return sorted(tops)


def open_folder(root: Path, split: str | None = None) -> FolderSource:
    """A folder, or its train/test split: `root/train` and `root/test` (or `val`) when present,
    otherwise a fixed 80/20 split of the files (stratified by class when there are classes)."""
    if not root.exists():
        raise UserError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (expected a folder of images or a built-in set name)")
    sub = {"train": ["train"], "test": ["test", "val"]}
    if split is not None:
        for name in sub[split]:
            if (root / name).is_dir() and (root / "train").is_dir():
                return open_folder(root / name)
    listed = list_images(root)
    if not listed:
        raise UserError(f"{root}: no image files found (looked recursively for {_suffixes()})")
    files = usable(root, listed)
    if not files:
        raise UserError(f"{root}: no usable image among {len(listed)} file(s) (all empty or unreadable)")
    classes = folder_classes(root, files)
    if split is not None:
        files = fixed_split(files, [f.relative_to(root).parts[0] if classes else "" for f in files], split)
    return FolderSource(root, files, classes)


def open_list(path: Path, split: str | None = None) -> FolderSource:
    """An image list such as `selfsup curate`'s selected.txt: one image path a line (blank lines and lines
    starting with # skipped), a relative one read from the current folder, else from the list's folder. No
    classes; `split` as a folder's (a fixed 80/20 split)."""
    entries = [line.strip() for line in path.read_text().splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise UserError(f"{path}: an image list without any path (expected one image path a line)")
    files = [Path(e) if Path(e).is_absolute() or Path(e).exists() else path.parent / e for e in entries]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: {len(missing)} of {len(files)} listed image(s) not found, the first: {missing[0]}")
    good = usable(path, files)
    if not good:
        raise UserError(f"{path}: no usable image among {len(files)} listed file(s) (all empty or unreadable)")
    if split is not None:
        good = fixed_split(good, [""] * len(good), split)
    return FolderSource(path, good, None, name=path.stem)


def fixed_split(items: list, groups: list, split: str, test_fraction: float = 0.2, seed: int = 0) -> list:
    """A deterministic, stratified train/test split: within each group a seeded permutation, the last
    `test_fraction` goes to test."""
    codes = {g: i for i, g in enumerate(sorted(set(groups)))}
    idx = stratified_split([codes[g] for g in groups], test_fraction, seed)[0 if split == "train" else 1]
    return [items[i] for i in idx]


def stratified_split(groups: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    gen = np.random.default_rng(seed)
    train, test = [], []
    arr = np.asarray(groups)
    for g in sorted(set(groups)):
        members = np.flatnonzero(arr == g)
        members = members[gen.permutation(len(members))]
        n_test = int(round(len(members) * test_fraction))
        train += members[: len(members) - n_test].tolist()
        test += members[len(members) - n_test :].tolist()
    return sorted(train), sorted(test)
