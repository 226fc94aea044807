"""Backbone weights in and out: a selfsup export (safetensors + a JSON config), a run folder, a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import BackboneConfig, Config, apply, to_dict
from .errors import UserError
from .nn import backbone_from_config


def save_backbone(backbone: nn.Module, cfg: Config, path: Path) -> None:
    """Weights as safetensors, the architecture beside them as JSON (`<name>.json`); both written atomically."""
    import os

    meta = {"backbone": to_dict(cfg.backbone), "method": cfg.method, "image_size": cfg.crops.global_size,
            "mean": list(cfg.crops.mean), "std": list(cfg.crops.std)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"selfsup": json.dumps(meta)})
    os.replace(tmp, path)
    json_path = path.with_suffix(".json")
    tmp_json = json_path.with_name(f".{json_path.name}.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_json, json_path)


class Loaded:
    """A backbone ready for features, with its architecture, input size and normalisation."""

    def __init__(self, backbone: nn.Module, config: BackboneConfig, image_size: int, mean, std, source: str):
        self.backbone, self.config, self.image_size = backbone, config, image_size
        self.mean, self.std, self.source = tuple(mean), tuple(std), source

    def random_init(self, seed: int = 0) -> nn.Module:
        """The same architecture, freshly initialised (the baseline of every evaluation)."""
        torch.manual_seed(seed)
        return backbone_from_config(self.config, drop_path=0.0).eval()


def _from_meta(meta: dict, state: dict[str, torch.Tensor], where: str) -> Loaded:
    b = BackboneConfig()
    apply(b, meta["backbone"], where)
    backbone = backbone_from_config(b, drop_path=0.0)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the architecture (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    return Loaded(backbone.eval(), b, meta["image_size"], meta["mean"], meta["std"], where)


def load(path: str | Path) -> Loaded:
    """A backbone from a run folder, a selfsup checkpoint (.pt) or a safetensors export."""
    from .train.checkpoint import load_checkpoint

    path = Path(path)
    if path.is_dir() and (path / "backbone.safetensors").exists():
        path = path / "backbone.safetensors"
    if path.suffix == ".safetensors":
        if not path.exists():
            raise UserError(f"{path}: no such file or directory")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("selfsup")
        if meta is None:
            raise UserError(f"{path}: a safetensors file without selfsup metadata (expected an export of selfsup)")
        return _from_meta(json.loads(meta), load_file(str(path)), str(path))
    state = load_checkpoint(path)
    cfg = Config()
    apply(cfg, state["config"], str(path))
    from .methods import build_method

    method = build_method(cfg)
    method.load_state_dict(state["method_state"])
    return Loaded(method.backbone().eval(), cfg.backbone, cfg.crops.global_size, cfg.crops.mean, cfg.crops.std,
                  str(path))
