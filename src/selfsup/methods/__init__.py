"""The method family, by the name `selfsup train --method NAME` takes. A method is one file: its class, with
its schedules, hooks and the network it keeps; `register_method` adds one at run time."""
from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from ..config import EXTRA_SECTIONS, METHOD_NAMES, RECIPE_DIRS, Config, register_section
from ..core.errors import UserError
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
