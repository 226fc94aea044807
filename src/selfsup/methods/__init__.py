"""The method family, by the name `selfsup train --method NAME` takes. A method is one file: its class, with
its schedules, hooks and the network it keeps; `register_method` adds one at run time."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from torch import nn

from ..config import EXTRA_SECTIONS, METHOD_NAMES, RECIPE_DIRS, Config, register_section
from ..errors import UserError
from .base import Method

METHODS: dict[str, str | type[Method]] = {  # a class, or "module.Class" of this package, imported when used
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


def register_method(name: str, cls: type[Method], recipes: Path | None = None, config: type | None = None) -> None:
    """Make `cls` trainable as `method: NAME` (config, CLI, checkpoints). `recipes`: a folder of its recipes
    (`NAME_mnist5k.yaml`, ...), found by name like the shipped ones; `config`: its own config section `NAME`, a
    dataclass of `checked` keys (list NAME in `cls.sections` to save it with its runs)."""
    if config is not None and name not in EXTRA_SECTIONS:
        register_section(name, config)
    METHODS[name] = cls
    if name not in METHOD_NAMES:
        METHOD_NAMES.append(name)
    if recipes is not None and Path(recipes) not in RECIPE_DIRS:
        RECIPE_DIRS.append(Path(recipes))


def method_class(name: str) -> type[Method]:
    check_method(name)
    entry = METHODS[name]
    if isinstance(entry, str):
        module, cls = entry.rsplit(".", 1)
        return getattr(importlib.import_module(f".{module}", __name__), cls)
    return entry


def build_method(cfg: Config, **networks: nn.Module) -> Method:
    """The method `cfg.method` built from `cfg`, given the networks its `inputs` returned."""
    return method_class(cfg.method)(cfg, **networks)


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
