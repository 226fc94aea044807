"""timm's DINOv2 state dicts (`vit_{small,base,large,giant}_patch14[_reg4]_dinov2`) to and from selfsup's key
layout, which is DINOv2's. They differ in two places (timm models/vision_transformer.py `_convert_dinov2`):

- register models: timm keeps the registers as `reg_token` and, with no_embed_class=True, a position embedding
  without the class position, whose value is folded into `cls_token` (the class token gets no position then);
- SwiGLU (giant): timm's `SwiGLUPacked` (layers/mlp.py `GluMlp`, gate first: silu(x1) * x2) keeps DINOv2's
  packed w12 as `mlp.fc1` and w3 as `mlp.fc2`.

timm's dinov2 models run at their built size; with dynamic_img_size=True timm resizes the position embedding to the
grid, bicubic and antialiased: as selfsup reads register models, and unlike the offset DINOv2's other models use.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import BackboneConfig
from .core.errors import UserError
from .core.io import atomic_write
from .nn.vit import VisionTransformer, swiglu_hidden

SUFFIXES = (".safetensors", ".pth", ".pt")


def _rename(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {k.replace(old, new): v for k, v in state.items()}


def to_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv2 state dict under DINOv2's names; any other state dict unchanged."""
    state = dict(state)
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
    pos = state.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # no_embed_class: a zero class position
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:  # SwiGLUPacked: fc1 = [w1; w2]
        state = _rename(_rename(state, ".mlp.fc1.", ".mlp.w12."), ".mlp.fc2.", ".mlp.w3.")
    return state


def from_dinov2(backbone: VisionTransformer, cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """The ViT's tensors in timm's layout. timm's dinov2 models have layer scale and a qkv bias: a ViT without
    them gets gamma = 1 and a zero bias, which change nothing."""
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items() if k != "mask_token"}
    if "register_tokens" in state:
        pos = state["pos_embed"]
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:].contiguous()
    state = _rename(_rename(state, ".mlp.w12.", ".mlp.fc1."), ".mlp.w3.", ".mlp.fc2.")
    d = backbone.embed_dim
    for i in range(len(backbone.blocks)):
        if cfg.layerscale is None:
            state |= {f"blocks.{i}.ls1.gamma": torch.ones(d), f"blocks.{i}.ls2.gamma": torch.ones(d)}
        if not cfg.qkv_bias:
            state[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d)
    return state


def model_kwargs(backbone: VisionTransformer, cfg: BackboneConfig) -> dict:
    """The arguments of timm's VisionTransformer (and of `timm.create_model("vit_*_dinov2", **kwargs)`) that hold
    the state dict; mlp_layer is named as a string."""
    d, patch = backbone.embed_dim, backbone.patch_size
    side = math.isqrt(backbone.pos_embed.shape[1] - 1)
    kwargs = dict(img_size=side * patch, patch_size=patch, in_chans=backbone.patch_embed.proj.in_channels,
                  embed_dim=d, depth=len(backbone.blocks), num_heads=backbone.num_heads, qkv_bias=True,
                  init_values=cfg.layerscale or 1.0, reg_tokens=backbone.n_registers,
                  no_embed_class=backbone.n_registers > 0, mlp_ratio=4.0)
    if cfg.ffn == "swiglu":  # timm's fc1 is int(d * mlp_ratio) wide, both halves: 2 h / d, + 0.5 / d for the floor
        kwargs |= dict(mlp_ratio=(2 * swiglu_hidden(4 * d) + 0.5) / d, mlp_layer="timm.layers.SwiGLUPacked",
                       act_layer="silu")
    return kwargs


def write(backbone: VisionTransformer, cfg: BackboneConfig, out: Path) -> dict:
    """The state dict in timm's layout, as safetensors (the model arguments in its metadata, "timm") or, by the
    suffix .pth / .pt, torch.save's pickle. Returns the model arguments."""
    if not isinstance(backbone, VisionTransformer):
        raise UserError(f"--format timm: backbone.arch={cfg.arch} is not a ViT (timm's dinov2 models are ViTs)")
    if out.suffix not in SUFFIXES:
        raise UserError(f"--out {out}: expected a file name ending in {', '.join(SUFFIXES)} for --format timm")
    state, kwargs = from_dinov2(backbone, cfg), model_kwargs(backbone, cfg)
    if out.suffix == ".safetensors":
        atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"timm": json.dumps(kwargs)}))
    else:
        atomic_write(out, lambda tmp: torch.save(state, tmp))
    return kwargs
