"""`open_source`, which turns any `--data` spec into a source: the built-in data that works offline (MNIST 5k,
scikit-learn's 8x8 digits and scikit-image's sample photos from data/packaged.py, generated scenes with masks and
depth from data/scenes.py), a folder, an image list or webdataset shards."""
from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError
from .packaged import digits, mnist5k, skimage_photos, split_tensor
from .scenes import CLASSES, GENERATOR, scene_arrays
from .shards import ShardSource
from .sources import Source, TensorSource, open_folder, open_list

BUILTIN = ("mnist5k", "digits", "skimage", "scenes")


def _scenes(split: str | None) -> TensorSource:
    """`scenes` as labelled images: the label is the class of the largest visible object. Without a split (what
    training reads) it is the train split: the test scenes stay unseen for the dense probes."""
    a = scene_arrays(split or "train")
    source = TensorSource(f"scenes:{split or 'train'}", a.images, a.labels, list(CLASSES[1:]))
    source.generator = GENERATOR
    return source


def open_source(spec: str, split: str | None = None) -> Source:
    """`spec` is a built-in name, a folder, or webdataset shards; `split` is None (all), 'train' or 'test'."""
    if spec == "mnist5k":
        return split_tensor(mnist5k(), split)
    if spec == "digits":
        return split_tensor(digits(), split)
    if spec == "skimage":
        return skimage_photos()
    if spec == "scenes":
        return _scenes(split)
    if spec == "scenes-video":
        raise UserError("--data scenes-video: video sequences are for `selfsup eval video`; train on --data scenes")
    if spec.endswith(".tar") or "{" in spec:
        return ShardSource(spec, split)
    if spec.endswith(".txt") and Path(spec).expanduser().is_file():
        return open_list(Path(spec).expanduser(), split)
    return open_folder(Path(spec).expanduser(), split)


def labelled_splits(spec: str) -> tuple[Source, Source]:
    """The train and test splits of a labelled source; a clear error for unlabelled data."""
    train, test = open_source(spec, "train"), open_source(spec, "test")
    if not train.labelled:
        raise UserError(f"{spec}: no labels (evaluation needs a built-in set, or a folder with one subfolder per class)")
    return train, test
