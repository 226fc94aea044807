"""The method family, by the name `selfsup train --method NAME` takes."""
from __future__ import annotations

from ..config import Config
from ..errors import UserError
from .base import Method

METHODS = {
    "simclr": "simclr.SimCLR",
    "moco": "moco.MoCo",
    "byol": "byol.BYOL",
    "dino": "dino.DINO",
    "ibot": "ibot.IBOT",
    "dinov2": "dinov2.DINOv2",
    "distill": "distill.Distill",
}


def build_method(cfg: Config) -> Method:
    if cfg.method not in METHODS:
        raise UserError(f"unknown method '{cfg.method}' (expected one of: {', '.join(METHODS)})")
    import importlib

    module, cls = METHODS[cfg.method].rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __name__), cls)(cfg)
