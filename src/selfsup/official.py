"""Official DINO / DINOv2 (and iBOT) backbone weights, loaded by their own key names.

Accepted: the released backbones (facebookresearch/dinov2 vit{s,b,l,g}14[_reg], facebookresearch/dino
ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8, ResNet-50) and the training checkpoints they come from (DINO's
`teacher`/`student` with `module.` and `backbone.` prefixes, DINOv2's `teacher` dumps and `model` checkpoints,
chunked blocks `blocks.{chunk}.{i}.`), and timm's state dicts of them (`timm_format.py`). The architecture is read
off the tensor shapes; weights.py loads them strictly into it.
"""
from __future__ import annotations

import math
import re

import torch

from . import timm_format
from .config import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig
from .core.errors import UserError
from .nn import RESNETS, VIT_SIZES
from .nn.resnet import Bottleneck
from .nn.vit import swiglu_hidden

CONTAINERS = ("teacher", "model", "state_dict", "student")  # the teacher first: DINO and DINOv2 evaluate it
IBOT_NAMES = {"masked_embed": "mask_token", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
EVAL_SIZE = 224  # DINO and DINOv2 evaluate at 224 px, whatever size the position embedding was built for


def default_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation of weights that name none: ImageNet's for 3 channels, else the mean of its three values on
    every channel (a gray level, as the adapted first convolution of `nn.adapt` sees it)."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,) * in_chans, (sum(IMAGENET_STD) / 3,) * in_chans


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, without it, when there are any; otherwise `state` unchanged."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner or state


def backbone_state(obj) -> dict[str, torch.Tensor] | None:
    """The backbone's tensors in a released file or a training checkpoint, under canonical names
    (DINOv2's), or None when `obj` holds none."""
    while not _is_state(obj):
        inner = next((obj[k] for k in CONTAINERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            return None
        obj = inner
    state = {k.removeprefix("module."): v for k, v in obj.items()}  # DDP
    state = _strip(_strip(state, "teacher."), "backbone.")  # DINOv2 `model` checkpoints; heads are dropped
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}  # BlockChunk
    for old, new in IBOT_NAMES.items():
        state = {re.sub(rf"(^|\.){old}$", rf"\g<1>{new}", k): v for k, v in state.items()}
    if "mask_token" in state and state["mask_token"].ndim == 1:  # iBOT stores it as [D]
        state["mask_token"] = state["mask_token"][None]
    return timm_format.to_dinov2(state)


def vit_config(state: dict[str, torch.Tensor], where: str) -> BackboneConfig:
    """A ViT's architecture from its tensor shapes (the head count from DINOv2's size table)."""
    dim = state["cls_token"].shape[-1]
    arch = next((a for a, s in VIT_SIZES.items() if s.embed_dim == dim), None)
    if arch is None:
        widths = ", ".join(f"{s.embed_dim} ({a})" for a, s in VIT_SIZES.items())
        raise UserError(f"{where}: a ViT {dim} wide (expected one of the widths {widths})")
    patch = state["patch_embed.proj.weight"].shape[-1]
    n_grid = state["pos_embed"].shape[1] - 1
    side = math.isqrt(n_grid)
    if side * side != n_grid:
        raise UserError(f"{where}: pos_embed has {n_grid} patch positions (expected a square grid)")
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
    if hidden != (swiglu_hidden(4 * dim) if swiglu else 4 * dim):
        raise UserError(f"{where}: an MLP {hidden} wide for a {dim}-wide ViT (expected DINOv2's mlp_ratio 4)")
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    return BackboneConfig(
        arch=arch,
        patch_size=patch,
        depth=1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))),
        img_size=side * patch,
        in_chans=state["patch_embed.proj.weight"].shape[1],
        drop_path=0.0,
        layerscale=1e-5 if "blocks.0.ls1.gamma" in state else None,  # DINOv2's init, for random_init()
        ffn="swiglu" if swiglu else "mlp",
        n_registers=registers,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        # DINOv2 hubconf: register models resize antialiased to the size; the others by (n + 0.1) / M
        interpolate_antialias=registers > 0,
        interpolate_offset=0.0 if registers else 0.1,
    )


def resnet_config(state: dict[str, torch.Tensor], where: str) -> BackboneConfig:
    bottleneck = "layer1.0.conv3.weight" in state
    layers = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    arch = next((n for n, (b, l) in RESNETS.items() if l == layers and (b is Bottleneck) == bottleneck), None)
    if arch is None:
        raise UserError(f"{where}: a ResNet with {layers} blocks per stage (expected one of {', '.join(RESNETS)})")
    return BackboneConfig(arch=arch, cifar_stem=state["conv1.weight"].shape[-1] == 3,
                         in_chans=state["conv1.weight"].shape[1], drop_path=0.0)


def from_object(obj, where: str) -> tuple[BackboneConfig, dict[str, torch.Tensor], tuple[str, ...]] | None:
    """The backbone in a loaded file in an official format, or None when it is not one: its architecture, its
    tensors, and the names of those it may lack (they start at zero). It evaluates at EVAL_SIZE with ImageNet
    statistics (`default_stats` for another channel count)."""
    state = backbone_state(obj)
    if state is None:
        return None
    try:
        if {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= state.keys():
            cfg, optional = vit_config(state, where), ("mask_token",)  # DINO's ViT has no mask token
        elif {"conv1.weight", "bn1.weight", "layer4.0.conv1.weight"} <= state.keys():
            # DINO's ResNet-50 is torchvision's with fc = Identity (its hubconf loads it non-strictly): a
            # classifier is no part of the backbone; num_batches_tracked is absent from old PyTorch's files
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            cfg, optional = resnet_config(state, where), ("num_batches_tracked",)
        else:
            return None
    except KeyError as e:
        raise UserError(f"{where}: an incomplete backbone (no tensor {e})") from None
    return cfg, state, optional
