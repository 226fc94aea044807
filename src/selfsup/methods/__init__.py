"""The method family, by the name `selfsup train --method NAME` takes."""
from __future__ import annotations

from typing import Callable

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


def check_method(name: str) -> None:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (expected one of: {', '.join(METHODS)})")


def build_method(cfg: Config) -> Method:
    check_method(cfg.method)
    import importlib

    module, cls = METHODS[cfg.method].rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __name__), cls)(cfg)


def resolve_init(cfg: Config, path: str) -> Callable[[Method], str]:
    """`selfsup train --init-from PATH`. Takes the pretrained backbone's architecture into `cfg.backbone` (the
    drop path stays the recipe's) and returns the function that loads the weights into a method built from
    `cfg`: the whole method (heads, teachers, centres) when PATH is a selfsup checkpoint or run folder of the
    same method with the same shapes; otherwise the backbone, into the student and its momentum teachers, with
    fresh heads. PATH is anything `selfsup.weights.load` accepts (official DINO / DINOv2 weights included)."""
    import dataclasses
    from pathlib import Path

    from ..train.checkpoint import latest, load_checkpoint
    from ..weights import load

    loaded = load(path)
    b = cfg.backbone
    cfg.backbone = dataclasses.replace(loaded.config, drop_path=b.drop_path, drop_path_uniform=b.drop_path_uniform)
    p = Path(path)
    checkpoint = latest(p) if p.is_dir() else (p if p.suffix == ".pt" else None)
    state = load_checkpoint(checkpoint) if checkpoint is not None else None

    def init(method: Method) -> str:
        if state is not None and state.get("method") == cfg.method:
            ours = method.state_dict()
            theirs = state["method_state"]
            if ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours):
                method.load_state_dict(theirs)
                return "the whole method (backbone, heads, teachers); a fresh optimiser and schedule"
        weights = loaded.backbone.state_dict()
        for backbone in method.backbones():
            backbone.load_state_dict(weights)
        return "the backbone, into the student and its teachers; fresh heads"

    return init
