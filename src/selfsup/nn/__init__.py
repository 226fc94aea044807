"""Backbones and heads."""
from __future__ import annotations

from torch import nn

from ..config import BackboneConfig
from ..core.errors import UserError
from .resnet import RESNETS, ResNet, resnet
from .vit import VIT_SIZES, VisionTransformer, xavier_init_


def build_backbone(name: str, patch_size: int = 16, **options) -> nn.Module:
    """Any backbone by name: vit_tiny/small/base/large/giant2 (DINOv2's layer sizes) or resnet18/34/50/101.
    ViT options: depth, num_heads, img_size, drop_path_rate, drop_path_uniform, layerscale, ffn, n_registers,
    qkv_bias, interpolate_antialias, interpolate_offset, pos_embed (learned | sincos), freeze_patch_embed,
    init (trunc_normal | xavier), in_chans; ResNet options: cifar_stem, in_chans. DINOv2's ViT-g/14 is
    `build_backbone("vit_giant2", patch_size=14, img_size=518, ffn="swiglu", layerscale=1e-5)`; MoCo v3's ViT-S/16
    `build_backbone("vit_small", num_heads=12, pos_embed="sincos", freeze_patch_embed=True, init="xavier")`."""
    if name in VIT_SIZES:
        size = VIT_SIZES[name]
        depth, heads = options.pop("depth", None) or size.depth, options.pop("num_heads", None) or size.num_heads
        if size.embed_dim % heads:
            raise UserError(f"num_heads={heads} does not divide {name}'s width {size.embed_dim} "
                            f"(backbone.num_heads: a divisor of it)")
        init = options.pop("init", "trunc_normal")
        if init not in ("trunc_normal", "xavier"):
            raise UserError(f"init={init!r}: expected trunc_normal or xavier")
        model = VisionTransformer(patch_size=patch_size, embed_dim=size.embed_dim, depth=depth, num_heads=heads,
                                  **options)
        return xavier_init_(model) if init == "xavier" else model
    if name in RESNETS:
        return resnet(name, **options)
    raise UserError(f"unknown backbone '{name}' (expected one of: {', '.join(VIT_SIZES)}, {', '.join(RESNETS)})")


def backbone_from_config(b: BackboneConfig, drop_path: float | None = None) -> nn.Module:
    """The backbone a config describes; `drop_path` overrides the rate (0 for teachers and evaluation)."""
    if b.arch.startswith("resnet"):
        return build_backbone(b.arch, cifar_stem=b.cifar_stem, in_chans=b.in_chans)
    return build_backbone(
        b.arch,
        patch_size=b.patch_size,
        depth=b.depth,
        img_size=b.img_size,
        drop_path_rate=b.drop_path if drop_path is None else drop_path,
        drop_path_uniform=b.drop_path_uniform,
        layerscale=b.layerscale,
        ffn=b.ffn,
        n_registers=b.n_registers,
        qkv_bias=b.qkv_bias,
        interpolate_antialias=b.interpolate_antialias,
        interpolate_offset=b.interpolate_offset,
        num_heads=b.num_heads,
        pos_embed=b.pos_embed,
        freeze_patch_embed=b.freeze_patch_embed,
        init=b.init,
        in_chans=b.in_chans,
    )


def feature_dim(backbone: nn.Module) -> int:
    return backbone.embed_dim


__all__ = ["VisionTransformer", "ResNet", "RESNETS", "VIT_SIZES", "build_backbone", "backbone_from_config",
           "feature_dim"]
