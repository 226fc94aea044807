"""webdataset tar shards: `--data 'shards/{000000..000099}.tar'`.

A shard is a plain tar whose members are grouped into samples by key (`000123.jpg`, `000123.cls`: the key
is the name up to the first dot of its base name). Opening a spec reads the tar headers of every shard
once (an index of where each image's bytes lie, and its label), so evaluation can read any sample; training
streams them (`ShardBatches`).
"""
from __future__ import annotations

import functools
import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..core.distributed import min_over_ranks
from ..core.errors import UserError
from .channels import to_uint8
from .sources import EncodedSource, Skipped, Source, decode, open_folder
from .views import MultiCrop

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
TEST_FRACTION = 5  # a labelled shard set holds out the samples whose key hashes to 0 mod 5 (20 %)


def expand(spec: str) -> list[Path]:
    """'dir/{000000..000099}.tar' (or a comma list in braces, or one .tar) -> the shard paths, all present."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise UserError("tar shards need the package webdataset (pip install webdataset)") from None
    paths = [Path(p).expanduser() for p in braceexpand(spec)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{spec}: {len(missing)} of {len(paths)} shard(s) not found, e.g. {missing[0]}")
    return paths


@dataclass(frozen=True)
class Index:
    """Where each sample's image lies: shard number, byte offset and size; its label (-1: none); its key."""

    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    keys: list[str]


def key_and_ext(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: Path) -> list[tuple[str, int, int, int]]:
    """(key, offset, size, label) of every sample with an image in one shard, in tar order."""
    samples: dict[str, list] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = key_and_ext(m.name)
                entry = samples.setdefault(key, [None, 0, -1])
                if ext in IMAGE_EXTS and entry[0] is None:
                    entry[0], entry[1] = m.offset_data, m.size
                elif ext == "cls":
                    entry[2] = int(tar.extractfile(m).read().decode().strip())
    except (tarfile.TarError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable tar shard ({type(e).__name__}: {e})") from None
    return [(k, off, size, label) for k, (off, size, label) in samples.items() if off is not None]


@functools.lru_cache(maxsize=8)
def scan(paths: tuple[Path, ...]) -> Index:
    rows = [(i, *row) for i, p in enumerate(paths) for row in scan_shard(p)]
    if not rows:
        raise UserError(f"{paths[0].parent}: no image in {len(paths)} shard(s) (expected members like "
                        f"000123.jpg, with an optional 000123.cls label)")
    shard, keys, offset, size, label = zip(*rows)
    return Index(np.array(shard), np.array(offset, dtype=np.int64), np.array(size, dtype=np.int64),
                 np.array(label, dtype=np.int64), list(keys))


def in_test_split(key: str) -> bool:
    return zlib.crc32(key.encode()) % TEST_FRACTION == 0


class ShardSource(EncodedSource):
    """The samples of a shard set; a labelled set (`.cls` members) splits by a hash of the key: 80 % train,
    20 % test."""

    streamed = True  # trains through ShardBatches

    def __init__(self, spec: str, split: str | None = None):
        self.paths = expand(spec)
        self.root = self.paths[0].parent
        index = scan(tuple(self.paths))
        self.classes = classes_of(self.root, index.label) if (index.label >= 0).any() else None
        keep = np.arange(len(index.keys))
        if split is not None and self.classes is not None:
            test = np.array([in_test_split(k) for k in index.keys])
            keep = keep[test if split == "test" else ~test]
        self.shard, self.offset, self.size = index.shard[keep], index.offset[keep], index.size[keep]
        self.keys = [index.keys[i] for i in keep]
        self._labels = torch.from_numpy(index.label[keep]) if self.classes is not None else None
        self.name = f"{self.root.name}:{split}" if split and self.classes else self.root.name
        self.skipped = Skipped()
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a loader worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.paths[shard], "rb")
        return self._files[shard]

    def read(self, k: int) -> torch.Tensor:
        f = self._file(int(self.shard[k]))
        f.seek(int(self.offset[k]))
        return decode(io.BytesIO(f.read(int(self.size[k]))), self.channels)

    def where(self, k: int) -> str:
        return f"{self.paths[int(self.shard[k])].name}:{self.keys[k]}"

    def __getstate__(self) -> dict:  # open files stay behind when a loader worker starts
        return {**self.__dict__, "_files": {}}


def classes_of(root: Path, labels: np.ndarray) -> list[str]:
    """Class names from `classes.txt` beside the shards (what `selfsup shards` writes), else the numbers."""
    names = root / "classes.txt"
    if names.is_file():
        return names.read_text().splitlines()
    return [str(c) for c in range(int(labels.max()) + 1)]


class ShardBatches(IterableDataset):
    """This rank's batches of multi-crop views from a shard set, streamed.

    Rank r reads shards r, r + W, r + 2W, ... (the same every epoch, so every epoch has as many batches),
    in a permutation seeded with (seed, epoch, rank); a seeded shuffle buffer mixes samples across
    neighbouring shards. Batch k of the epoch is the next `global_batch / W` samples of that stream, and
    loader worker w makes the batches k = w (mod workers), reading only their bytes: no sample is read twice,
    and the batches are the same whatever the number of workers (a resumed run repeats them exactly). Every
    rank makes the number of batches of the rank with the fewest samples; the rest of an epoch is dropped.
    """

    def __init__(self, source: ShardSource, multicrop: MultiCrop, global_batch: int, rank: int = 0,
                 world: int = 1, seed: int = 0, buffer: int = 1000):
        if global_batch % world:
            raise UserError(f"optim.batch_size={global_batch} must be divisible by the number of processes ({world})")
        if len(source.paths) < world:
            raise UserError(f"{source.root}: {len(source.paths)} shard(s) for {world} processes (each needs one)")
        self.source, self.multicrop, self.seed, self.rank, self.buffer = source, multicrop, seed, rank, buffer
        self.local_batch = global_batch // world
        self.mine = [s for s in range(len(source.paths)) if s % world == rank]
        self.members = {s: np.flatnonzero(source.shard == s) for s in self.mine}
        n = sum(len(m) for m in self.members.values())
        self.n_batches = min_over_ranks(n // self.local_batch)
        if self.n_batches == 0:
            raise UserError(f"{source.root}: fewer than {self.local_batch} images on some process's shards "
                            "(lower optim.batch_size, or write smaller shards)")
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def stream(self) -> np.ndarray:
        """This rank's sample order in the current epoch: shards permuted, then a shuffle buffer."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        order = np.concatenate([self.members[self.mine[i]] for i in rng.permutation(len(self.mine))])
        out, buf = np.empty_like(order), list(order[: self.buffer])
        for i, nxt in enumerate(order[self.buffer :].tolist() + [None] * len(buf)):
            j = int(rng.integers(len(buf)))
            out[i] = buf[j]
            if nxt is None:
                buf.pop(j)
            else:
                buf[j] = nxt
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order, b = self.stream(), self.local_batch
        for k in range(self.start + worker, self.n_batches, workers):
            samples = [(*self.source[int(i)], int(i)) for i in order[k * b : (k + 1) * b]]
            yield self.multicrop(samples, self.epoch)

    def indices(self, k: int) -> list[int]:
        """The samples of batch k of the current epoch (for tests and checks)."""
        return self.stream()[k * self.local_batch : (k + 1) * self.local_batch].tolist()


def require_webdataset(flag: str):
    """The webdataset module, an optional install (the `shards` extra)."""
    try:
        import webdataset
    except ImportError:
        raise UserError(f"{flag} needs the package webdataset (pip install webdataset)") from None
    return webdataset


def check_target(out: str | Path, flag: str) -> Path:
    """A folder for new shards: one that holds .tar files already is refused (before any work is done)."""
    out = Path(out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise UserError(f"{flag} {out}: already holds .tar files (choose an empty folder)")
    return out


def write_shards(parts: list[tuple[Source, list[int]]], out: Path, shard_size: int, seed: int,
                 flag: str = "--shards") -> dict:
    """The images `parts` names (each a source and indices into it) as webdataset tar shards out/000000.tar, ...
    in a seeded random order: files' bytes unchanged, other images (shards, built-in sets) encoded as PNG; labels
    where the source has the first source's classes, `classes.txt` beside them. Returns the counts and the spec to
    train on (`selfsup train --data SPEC`)."""
    wds = require_webdataset(flag)
    out.mkdir(parents=True, exist_ok=True)
    items = [(s, i) for s, idx in parts for i in idx]
    classes = parts[0][0].classes
    labels = {id(s): s.labels().tolist() for s, _ in parts if classes and s.classes == classes}
    order = np.random.default_rng(seed).permutation(len(items))
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for key, j in enumerate(order.tolist()):
            source, i = items[j]
            files = getattr(source, "files", None)
            if files is not None:
                ext = files[i].suffix.lower().lstrip(".").replace("jpeg", "jpg")
                sample = {"__key__": f"{key:08d}", ext: files[i].read_bytes()}
            else:
                buf = io.BytesIO()
                Image.fromarray(to_uint8(source[i][0]).permute(1, 2, 0).numpy()).save(buf, format="PNG")
                sample = {"__key__": f"{key:08d}", "png": buf.getvalue()}
            if id(source) in labels:
                sample["cls"] = labels[id(source)][i]
            sink.write(sample)
        n_shards = max(sink.shard, 1)
    if classes:
        (out / "classes.txt").write_text("\n".join(classes) + "\n")
    spec = f"{out}/{{{0:06d}..{n_shards - 1:06d}}}.tar" if n_shards > 1 else f"{out}/000000.tar"
    return {"images": len(items), "shards": n_shards, "spec": spec}


def pack_folder(folder: str | Path, out: str | Path, shard_size: int = 1000, seed: int = 0) -> dict:
    """`selfsup shards`: every usable image of `folder` (labels from its class subfolders, if any) as shards in
    `out` (`write_shards`); the result also names the classes."""
    require_webdataset("selfsup shards")
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: expected at least 1")
    target = check_target(out, "--out")
    source = open_folder(Path(folder).expanduser())
    return {**write_shards([(source, list(range(len(source.files))))], target, shard_size, seed, "selfsup shards"),
            "classes": source.classes}
