"""Backbone weights in and out: a selfsup export (safetensors + a JSON config), a run folder, a checkpoint, or
an official DINO/DINOv2 file (see `official.py`); and `--init-from`, which loads them into a method."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import hf, official
from .config import BackboneConfig, Config, apply, eval_size, to_dict
from .core.errors import UserError
from .core.io import atomic_write
from .methods import build_method, method_class
from .methods.base import Method
from .nn import backbone_from_config
from .nn.adapt import adapt_input_channels
from .training.checkpoint import latest, load_checkpoint, read_run

EXPECTED = ("a selfsup run folder, a selfsup checkpoint (.pt), a selfsup safetensors export, a Hugging Face DINOv2 "
            "folder (config.json + model.safetensors), or an official DINO/DINOv2 backbone or training checkpoint or a "
            "timm DINOv2 state dict (.pth, .safetensors)")


def _export(backbone: nn.Module, meta: dict, path: Path) -> None:
    """Weights as safetensors, the architecture beside them as JSON (`<name>.json`); both written atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"selfsup": json.dumps(meta)}))
    atomic_write(path.with_suffix(".json"), json.dumps(meta, indent=2))


def save_backbone(backbone: nn.Module, cfg: Config, path: Path) -> None:
    """Export a run's backbone with its architecture, input size and normalisation."""
    _export(backbone, {"backbone": to_dict(cfg.backbone), "method": cfg.method, "image_size": eval_size(cfg),
                       "mean": list(cfg.crops.mean), "std": list(cfg.crops.std)}, path)


class Loaded:
    """A backbone ready for features, with its architecture, input size and normalisation."""

    def __init__(self, backbone: nn.Module, config: BackboneConfig, image_size: int, mean, std, source: str):
        self.backbone, self.config, self.image_size = backbone, config, image_size
        self.mean, self.std, self.source = tuple(mean), tuple(std), source

    def random_init(self, seed: int = 0) -> nn.Module:
        """The same architecture, freshly initialised (the baseline of every evaluation)."""
        torch.manual_seed(seed)
        return backbone_from_config(self.config, drop_path=0.0).eval()

    def save(self, path: str | Path) -> None:
        """Export to safetensors (official weights become a selfsup export, loadable without their format)."""
        _export(self.backbone, {"backbone": to_dict(self.config), "method": None, "image_size": self.image_size,
                                "mean": list(self.mean), "std": list(self.std), "source": self.source}, Path(path))


def with_weights(cfg: BackboneConfig, state: dict[str, torch.Tensor], where: str,
                 optional: Sequence[str] = ()) -> nn.Module:
    """The backbone `cfg` describes, in eval mode, holding every tensor of `state` (checked by name and shape).
    Only entries whose names end with one of `optional` may be missing: they start at zero (a mask token, a
    BatchNorm counter). Built on the meta device, so a big model is neither initialised nor held twice."""
    with torch.device("meta"):
        model = backbone_from_config(cfg, drop_path=0.0)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(tuple(optional))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{where}: the weights do not match the architecture (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, shapes {shapes[:3]})")
    state = {k: state[k].to(v.dtype) if k in state else torch.zeros(v.shape, dtype=v.dtype) for k, v in own.items()}
    model.load_state_dict(state, assign=True)
    assert not any(t.is_meta for t in model.buffers()), "a non-persistent buffer would stay on the meta device"
    return model.eval()


def _from_official(obj, where: str) -> Loaded | None:
    """An official DINO/DINOv2 backbone (official.py), at its evaluation size with ImageNet statistics (for 3
    channels: `official.default_stats`)."""
    found = official.from_object(obj, where)
    if found is None:
        return None
    cfg, state, optional = found
    mean, std = official.default_stats(cfg.in_chans)
    return Loaded(with_weights(cfg, state, where, optional), cfg, official.EVAL_SIZE, mean, std, where)


def _from_export(path: Path) -> Loaded:
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get("selfsup")
    state = load_file(str(path))
    if meta is None:  # official weights converted to safetensors
        loaded = _from_official(state, str(path))
        if loaded is None:
            raise UserError(f"{path}: a safetensors file without selfsup metadata or official key names "
                            f"(expected {EXPECTED})")
        return loaded
    meta = json.loads(meta)
    b = BackboneConfig()
    apply(b, meta["backbone"], str(path))
    return Loaded(with_weights(b, state, str(path)), b, meta["image_size"], meta["mean"], meta["std"], str(path))


def _from_checkpoint(state: dict, where: str) -> Loaded:
    """The network the run's method keeps, read by its state-dict prefix: no method (nor a distillation's
    teacher run) is built."""
    cfg = Config()
    apply(cfg, state["config"], where)
    prefix = method_class(cfg.method).keeps + "."
    weights = {k[len(prefix):]: v for k, v in state["method_state"].items() if k.startswith(prefix)}
    return Loaded(with_weights(cfg.backbone, weights, where), cfg.backbone, eval_size(cfg), cfg.crops.mean,
                  cfg.crops.std, where)


def run_backbone_file(run: Path) -> Path | None:
    """The file `load` reads from a run folder: its export, else its latest checkpoint."""
    export = run / "backbone.safetensors"
    return export if export.exists() else latest(run)


def load(path: str | Path) -> Loaded:
    """A backbone in eval mode from a run folder (its export, else its latest checkpoint), a selfsup checkpoint,
    a safetensors export, a Hugging Face transformers DINOv2 folder (hf.py), or an official DINO/DINOv2 file or
    timm's state dict of one. A .pt/.pth file is a pickle: load only files you trust."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory (expected {EXPECTED})")
    if hf.is_folder(path):
        cfg, state, size, mean, std = hf.read(path)
        return Loaded(with_weights(cfg, state, str(path)), cfg, size, mean, std, str(path))
    if path.is_dir():
        found = run_backbone_file(path)
        if found is None and (path / "model.safetensors").exists():
            raise UserError(f"{path}: model.safetensors without config.json (a Hugging Face folder needs both)")
        if found is None:
            raise UserError(f"{path}: a folder without backbone.safetensors or checkpoint-*.pt (expected {EXPECTED})")
        path = found
    if path.suffix == ".safetensors":
        return _from_export(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is none of the formats
        raise UserError(f"{path}: not a readable PyTorch file ({type(e).__name__}; expected {EXPECTED})") from None
    if isinstance(obj, dict) and "method_state" in obj and "config" in obj:
        return _from_checkpoint(obj, str(path))
    loaded = _from_official(obj, str(path))
    if loaded is None:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: no backbone in a known format (found {keys}; expected {EXPECTED})")
    return loaded


def _fits(cfg: Config, theirs: dict[str, torch.Tensor]) -> bool:
    """Whether a method built from `cfg` has exactly the tensors of `theirs` (built on the meta device)."""
    run_cfg, networks = method_class(cfg.method).inputs(cfg, read_run)
    with torch.device("meta"):
        ours = build_method(run_cfg, **networks).state_dict()
    return ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)


def resolve_init(cfg: Config, path: str) -> Callable[[Method], str]:
    """`selfsup train --init-from PATH` (init.checkpoint). Takes the pretrained backbone's architecture into
    `cfg.backbone` (the drop path stays the recipe's), resolves init.mode and returns the function that loads
    the weights into a method built from `cfg`: "method", the whole method (heads, teachers, centres), where PATH
    is a selfsup checkpoint or run folder of the same method with the same shapes; "backbone", the backbone into
    the student and its momentum teachers with fresh heads, which the trainer then warms up on the frozen
    backbone (InitConfig). PATH is anything `load` accepts (official DINO / DINOv2 weights included)."""
    loaded = load(path)
    b = cfg.backbone
    cfg.backbone = dataclasses.replace(loaded.config, drop_path=b.drop_path, drop_path_uniform=b.drop_path_uniform,
                                       in_chans=b.in_chans)  # the run's channels: the first conv is adapted
    p = Path(path)
    checkpoint = latest(p) if p.is_dir() else (p if p.suffix == ".pt" else None)
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    whole = state is not None and state.get("method") == cfg.method and _fits(cfg, state["method_state"])
    if cfg.init.mode == "method" and not whole:
        raise UserError(f"init.mode=method: {path} holds no {cfg.method} run with this run's shapes (init.mode=auto "
                        "or backbone loads its backbone with fresh heads)")
    mode = cfg.init.mode = "method" if whole and cfg.init.mode != "backbone" else "backbone"
    cfg.init.checkpoint = str(path)

    def init(method: Method) -> str:
        if mode == "method":
            method.load_state_dict(state["method_state"])
            return "the whole method (backbone, heads, teachers); a fresh optimiser and schedule"
        weights = adapt_input_channels(loaded.backbone.state_dict(), b.in_chans)
        for backbone in method.backbones():
            backbone.load_state_dict(weights)
        return "the backbone, into the student and its teachers; fresh heads, warmed up on the frozen backbone"

    return init
