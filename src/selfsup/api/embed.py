"""`selfsup.embed(checkpoint, data, out)`: the features of every image of a data set, in one safetensors file for
other tools; `selfsup embed` calls it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.device import resolve_device
from ..core.errors import UserError
from ..core.io import atomic_write
from ..data.builtin import open_source
from ..eval.features import extract
from ..weights import load

log = logging.getLogger("selfsup")


def file_names(source) -> list[str] | None:
    """Paths relative to the folder, in feature order, for sources of files."""
    files = getattr(source, "files", None)
    return [str(Path(f).relative_to(source.root)) for f in files] if files is not None else None


def embed(checkpoint: str | Path, data: str | Path, out: str | Path, *, patch_mean: bool = False,
          device: str = "auto", batch_size: int = 64, workers: int | None = None) -> dict:
    """Write `out` (.safetensors): 'features' [N, D] ([CLS]; a ResNet's pooled feature), with `patch_mean` the mean
    of the patch tokens ([N, D], registers excluded), and 'labels' [N] where known; its metadata entry 'selfsup'
    is JSON (checkpoint, data, input size and normalisation, file names, class names). Images are resized and
    centre-cropped as for evaluation. Returns what was written: path, images, the tensors' shapes, the source."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: expected at least 1")
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: expected 0 (decode in this process) or more")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: expected a file name ending in .safetensors")
    loaded = load(checkpoint)
    dev = resolve_device(device)
    source = open_source(str(data))
    backbone = loaded.backbone.to(dev).eval()

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        o = backbone.forward_features(x)
        feats = {"features": o["x_norm_clstoken"]}
        if patch_mean:
            feats["patch_mean"] = o["x_norm_patchtokens"].mean(1)
        return feats

    tensors, labels = extract(forward, source, loaded.image_size, dev, batch_size, loaded.mean, loaded.std,
                              desc=f"embed {data}", workers=workers)
    if getattr(source, "replaced", 0):  # files left out up front (source.skipped) have no row to repeat
        log.warning(f"{data}: {source.replaced} unreadable file(s) replaced by the next image; their rows repeat it")
    if source.labelled:
        tensors["labels"] = labels
    meta = {"checkpoint": str(checkpoint), "data": str(data), "image_size": loaded.image_size,
            "mean": list(loaded.mean), "std": list(loaded.std), "files": file_names(source),
            "classes": source.classes}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata={"selfsup": json.dumps(meta)}))
    return {"path": str(out), "images": int(tensors["features"].shape[0]),
            "tensors": {k: list(v.shape) for k, v in tensors.items()}, "source": loaded.source}
