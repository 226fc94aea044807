"""`export`: any backbone `load` reads, written in another format: selfsup's own safetensors, a Hugging Face
transformers folder (hf.py), a timm state dict (timm_format.py) or an ONNX graph (onnx_export.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from . import hf, onnx_export, timm_format
from .core.errors import UserError
from .weights import Loaded, load

log = logging.getLogger("selfsup")

FORMATS = ("safetensors", "hf", "timm", "onnx")


def export(source: str | Path | Loaded, format: str, out: str | Path) -> Path:
    """Write the backbone of `source` (anything `load` accepts, or a `Loaded`) to `out` in `format`: a
    .safetensors file (safetensors), a folder (hf), a .safetensors / .pth file (timm), a .onnx file (onnx).
    Returns `out`."""
    if format not in FORMATS:
        raise UserError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    loaded = source if isinstance(source, Loaded) else load(source)
    b = loaded.backbone.eval()
    if format == "safetensors":
        if out.suffix != ".safetensors":
            raise UserError(f"--out {out}: expected a file name ending in .safetensors for --format safetensors")
        loaded.save(out)
    elif format == "hf":
        hf.write(b, loaded.config, loaded.image_size, loaded.mean, loaded.std, out)
    elif format == "timm":
        kwargs = timm_format.write(b, loaded.config, out)
        log.info(f"timm: load into timm.models.vision_transformer.VisionTransformer(**{kwargs}) "
                 "(mlp_layer the class it names)")
    elif not onnx_export.write(b, loaded.image_size, out):
        log.info(f"onnx: a fixed {loaded.image_size} px input (the antialiased position-embedding resize has no "
                 "ONNX export)")
    return out
