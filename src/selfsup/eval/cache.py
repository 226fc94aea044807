"""The feature cache: frozen features are computed once per (checkpoint, data, split) and kept as safetensors.

Where: `<run>/features/` for a checkpoint inside a run folder; `selfsup-features/` beside any other checkpoint
file; `~/.cache/selfsup/features/` when that folder is not writable or the checkpoint is not a file. The key
holds the checkpoint's path, size and modification time, the data's files (or built-in name), the input size
and normalisation, so a retrained checkpoint or a changed folder never reads stale features. Each file keeps its
key in its metadata; writing an entry deletes the entries it supersedes (same checkpoint path, data, split and
settings, older checkpoint or data) and those of checkpoints that no longer exist, so the cache does not grow
with every retraining.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.io import atomic_write
from ..data.sources import Source
from ..weights import run_backbone_file

log = logging.getLogger("selfsup")
VERSION = 3  # bump when what is stored changes (3: the evaluation view is torchvision's Resize + CenterCrop)


def run_folder(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (it holds config.yaml), or None."""
    p = Path(checkpoint).expanduser()
    for folder in (p, p.parent) if p.is_file() else (p,):
        if folder.is_dir() and (folder / "config.yaml").exists():
            return folder
    return None


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfsup" / "features"


def cache_folder(checkpoint: str | Path) -> Path:
    """Where the features of `checkpoint` are cached (created on first write)."""
    run = run_folder(checkpoint)
    if run is not None:
        return run / "features"
    p = Path(checkpoint).expanduser()
    if p.is_file() and os.access(p.parent, os.W_OK):
        return p.parent / "selfsup-features"
    return user_cache()


def file_identity(path: str | Path) -> dict:
    """A checkpoint's identity: the resolved path, size and modification time of the file `load` reads (or its
    name, if not a file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = run_backbone_file(p) or p
    if not p.is_file():
        return {"name": str(path)}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def data_identity(source: Source) -> dict:
    """A source's identity: its files with sizes and times (a folder), else its name and length (built-in), and
    for generated data the generator's version."""
    files = getattr(source, "files", None)
    ident = {"name": source.name, "n": len(source)}
    if getattr(source, "generator", None):  # generated data (scenes): the generator's version
        ident["generator"] = source.generator
    if files is not None:
        h = hashlib.sha1()
        for f in files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        ident["files"] = h.hexdigest()
    return ident


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-40:] or "data"


class FeatureCache:
    """Cached features of one checkpoint; `folder=None` turns caching off."""

    def __init__(self, folder: Path | None, checkpoint: str | Path, variant: str = "trained"):
        self.folder, self.checkpoint, self.variant = folder, checkpoint, variant

    def key(self, split: str, source: Source, **settings) -> dict:
        return {"version": VERSION, "checkpoint": file_identity(self.checkpoint), "variant": self.variant,
                "data": data_identity(source), "split": split, **settings}

    def path(self, spec: str, key: dict) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"{slug(spec)}-{key['split']}-{self.variant}-{digest}.safetensors"

    def partial(self, spec: str, split: str, source: Source, **settings) -> Path | None:
        """Where an extraction of these features keeps the rows it has done (`extract(resume=...)`), so that a
        stopped one resumes; None without a cache."""
        if self.folder is None:
            return None
        path = self.path(spec, self.key(split, source, **settings))
        return path.with_name(f"{path.stem}.partial.safetensors")

    def get(self, spec: str, split: str, source: Source, compute: Callable[[], tuple[dict, torch.Tensor]],
            **settings) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The features and labels of one split: read from the cache, or computed and written to it."""
        if self.folder is None:
            return compute()
        key = self.key(split, source, **settings)
        path = self.path(spec, key)
        if path.exists():
            try:
                stored = load_file(str(path))
                labels = stored.pop("labels")
                log.info("features of %s (%s): from the cache %s", spec, split, path)
                return stored, labels
            except Exception as e:  # noqa: BLE001 - a damaged cache file is recomputed, never fatal
                log.warning("%s: unreadable cache file (%s), computing the features again", path, type(e).__name__)
        feats, labels = compute()
        if self._write(path, key, {**feats, "labels": labels}):
            prune(self.folder, keep=path, key=key)
        return feats, labels

    def _write(self, path: Path, key: dict, tensors: dict[str, torch.Tensor]) -> bool:
        try:
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={KEY: json.dumps(key)}))
            log.info("features cached in %s", path)
            return True
        except OSError as e:
            log.warning("features not cached: %s (%s)", path.parent, e.strerror or type(e).__name__)
            return False


KEY = "selfsup.feature_key"


def slot(key: dict) -> str:
    """What an entry is the features of, whatever the version of the checkpoint file, of the data and of the cache
    (an entry of an older VERSION is superseded too)."""
    ckpt = {k: v for k, v in key["checkpoint"].items() if k in ("path", "name")}
    rest = {k: v for k, v in key.items() if k != "version"}
    return json.dumps({**rest, "checkpoint": ckpt, "data": key["data"]["name"]}, sort_keys=True)


def stored_key(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[KEY])
    except Exception:  # noqa: BLE001 - not one of ours, or damaged: left alone
        return None


def prune(folder: Path, keep: Path, key: dict) -> None:
    """Delete the entries `keep` supersedes and those of checkpoint files that are gone."""
    superseded = slot(key)
    for f in folder.glob("*.safetensors"):
        other = stored_key(f) if f != keep else None
        if other is None:
            continue
        gone = "path" in other["checkpoint"] and not Path(other["checkpoint"]["path"]).exists()
        if gone or slot(other) == superseded:
            f.unlink(missing_ok=True)
            log.info("stale features removed: %s", f)
