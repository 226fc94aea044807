"""Hugging Face `transformers` DINOv2 folders: config.json + model.safetensors of `Dinov2Model` or
`Dinov2WithRegistersModel` (any `num_channels`), read into selfsup's ViT and written from it. A folder of
`Dinov2ForImageClassification` / `Dinov2WithRegistersForImageClassification` reads as its backbone: the keys under
the model type's prefix (`dinov2.`, `dinov2_with_registers.`), the `classifier.` head dropped.

Reading needs no transformers. Writing uses its config classes, so that config.json is the one the installed
version reads; the weights are written in the key layout `save_pretrained` itself writes (that of transformers 4,
which transformers 5 renames on loading). Both resize the position embedding to the grid, bicubic, the register
model antialiased: a folder read here resizes as transformers does.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import BackboneConfig
from .core.errors import UserError
from .core.io import atomic_write
from .data.views import eval_short_side
from .nn import VIT_SIZES
from .nn.vit import VisionTransformer
from .official import default_stats

log = logging.getLogger("selfsup")

CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
# the config keys read, with transformers' defaults (configuration_dinov2*.py)
DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4, "image_size": 224,
            "patch_size": 14, "num_channels": 3, "qkv_bias": True, "layerscale_value": 1.0, "use_swiglu_ffn": False,
            "layer_norm_eps": 1e-6, "hidden_act": "gelu", "num_register_tokens": 0}
# transformers' names (modeling_dinov2.py, as saved) -> selfsup's (DINOv2's)
TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
       "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
       "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
       "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
       "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
# per block: the saved names first, then transformers 5's module names (its conversion_mapping.py)
BLOCK = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
         "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma", "mlp.fc1": "mlp.fc1",
         "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
         "attention.o_proj": "attn.proj", "mlp.down_proj": "mlp.w3"}
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# separate projections that selfsup packs along the output axis, in order
PACKED = {QKV: "attn.qkv", ("attention.q_proj", "attention.k_proj", "attention.v_proj"): "attn.qkv",
          ("mlp.gate_proj", "mlp.up_proj"): "mlp.w12"}
PART = {name: (target, j) for names, target in PACKED.items() for j, name in enumerate(names)}
LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+?)((?:\.weight|\.bias)?)$")
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+?)((?:\.weight|\.bias)?)$")


def is_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def to_selfsup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' keys -> selfsup's; unknown keys pass unchanged, for `with_weights` to name."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in state.items():
        m = LAYER_KEY.match(k)
        if k in TOP:
            out[TOP[k]] = v
        elif m and m[2] in BLOCK:
            out[f"blocks.{m[1]}.{BLOCK[m[2]]}{m[3]}"] = v
        elif m and m[2] in PART:
            target, j = PART[m[2]]
            parts.setdefault(f"blocks.{m[1]}.{target}{m[3]}", {})[j] = v
        else:
            out[k] = v
    return out | {k: torch.cat([p[j] for j in sorted(p)]) for k, p in parts.items()}


def from_selfsup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """selfsup's keys -> transformers' saved layout (layer scale and bias as given: see `write`)."""
    inverse_top = {v: k for k, v in TOP.items()}
    inverse_block = {v: k for k, v in reversed(BLOCK.items())}  # the saved names win
    out = {}
    for k, v in state.items():
        m = BLOCK_KEY.match(k)
        if k in inverse_top:
            out[inverse_top[k]] = v
        elif m and m[2] == "attn.qkv":
            out |= {f"encoder.layer.{m[1]}.{n}{m[3]}": t for n, t in zip(QKV, v.chunk(3))}
        else:
            out[f"encoder.layer.{m[1]}.{inverse_block[m[2]]}{m[3]}"] = v
    return out


def _square(value, key: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"{where}: {key}={value} (selfsup's ViT takes square ones)")
        value = value[0]
    return int(value)


def read(folder: Path) -> tuple[BackboneConfig, dict[str, torch.Tensor], int, list[float], list[float]]:
    """The ViT of a transformers folder: architecture, tensors under selfsup's names, evaluation size and
    normalisation (preprocessor_config.json's crop size and statistics where there is one; else config.json's
    image_size and ImageNet statistics, as for official weights)."""
    where = str(folder / "config.json")
    raw = json.loads((folder / "config.json").read_text())
    kind = raw.get("model_type")
    if kind not in CLASSES:
        raise UserError(f"{where}: model_type {kind!r} (expected dinov2 or dinov2_with_registers)")
    c = DEFAULTS | ({"patch_size": 16, "num_register_tokens": 4} if kind != "dinov2" else {}) | raw
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    arch = next((a for a, s in VIT_SIZES.items() if s.embed_dim == dim), None)
    unsupported = {"hidden_size": arch is None, "mlp_ratio": c["mlp_ratio"] != 4,
                   "layer_norm_eps": c["layer_norm_eps"] != 1e-6,
                   "hidden_act": c["hidden_act"] != "gelu" and not c["use_swiglu_ffn"]}
    bad = next((k for k, v in unsupported.items() if v), None)
    if bad:
        raise UserError(f"{where}: {bad}={c[bad]!r} has no selfsup equivalent (selfsup's ViT: widths "
                        f"{', '.join(str(s.embed_dim) for s in VIT_SIZES.values())}, mlp_ratio 4, layer_norm_eps 1e-6, "
                        "gelu or SwiGLU)")
    patch = _square(c["patch_size"], "patch_size", where)
    registers = c["num_register_tokens"] if kind != "dinov2" else 0
    cfg = BackboneConfig(
        arch=arch, patch_size=patch, depth=c["num_hidden_layers"],
        img_size=_square(c["image_size"], "image_size", where), in_chans=c["num_channels"], drop_path=0.0,
        layerscale=c["layerscale_value"],
        ffn="swiglu" if c["use_swiglu_ffn"] else "mlp",
        n_registers=registers, qkv_bias=c["qkv_bias"], num_heads=None if heads == VIT_SIZES[arch].num_heads else heads,
        interpolate_antialias=registers > 0, interpolate_offset=0.0)  # modeling_dinov2*.py interpolate_pos_encoding
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise UserError(f"{folder}: config.json without model.safetensors (a transformers folder saved with "
                        "safetensors)")
    pre = folder / "preprocessor_config.json"
    p = json.loads(pre.read_text()) if pre.exists() else {}
    crop = p.get("crop_size", cfg.img_size)
    size = crop["height"] if isinstance(crop, dict) else int(crop)
    mean, std = (list(p.get(k, d)) for k, d in zip(("image_mean", "image_std"), default_stats(cfg.in_chans)))
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
        raise UserError(f"{pre}: image_mean {mean} and image_std {std} for num_channels={cfg.in_chans} (expected "
                        f"{cfg.in_chans} numbers each)")
    return cfg, backbone_state(load_file(str(weights)), kind), size, mean, std


def backbone_state(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors under selfsup's names; those of an image classifier (`<model type>.` keys, as
    `Dinov2ForImageClassification` saves them) without its `classifier.` head."""
    prefix = f"{kind}."
    if any(k.startswith(prefix) for k in state):
        head = [k for k in state if k.startswith("classifier.")]
        if head:
            log.info(f"Hugging Face classifier: its backbone read, its head ({', '.join(sorted(head))}) dropped")
        state = {k.removeprefix(prefix): v for k, v in state.items() if not k.startswith("classifier.")}
    return to_selfsup(state)


def write(backbone: VisionTransformer, cfg: BackboneConfig, image_size: int, mean, std, out: Path) -> None:
    """A folder `transformers.AutoModel.from_pretrained(out)` loads: config.json, model.safetensors and
    preprocessor_config.json (resize to `eval_short_side`, centre crop, normalise: selfsup's evaluation view; RGB
    conversion for 3 channels only). num_channels is the backbone's in_chans.
    A ViT without layer scale gets lambda1 = 1, the identity; the outputs are the same."""
    if not isinstance(backbone, VisionTransformer):
        raise UserError(f"--format hf: backbone.arch={cfg.arch} is not a ViT (transformers' DINOv2 holds ViTs only)")
    try:
        import transformers
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'selfsup[hf]'") from None
    registers = backbone.n_registers
    kind = "dinov2_with_registers" if registers else "dinov2"
    interp = (registers > 0, 0.0)
    if (backbone.interpolate_antialias, backbone.interpolate_offset) != interp:
        log.warning(f"--format hf: {CLASSES[kind]} resizes the position embedding to the grid"
                    f"{', antialiased' if registers else ''}; this ViT (interpolate_antialias="
                    f"{backbone.interpolate_antialias}, interpolate_offset={backbone.interpolate_offset}) does not, so "
                    "outputs agree at the native size only")
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    if cfg.layerscale is None:
        state |= {f"blocks.{i}.ls{j}.gamma": torch.ones(backbone.embed_dim) for i in range(len(backbone.blocks))
                  for j in (1, 2)}
    side = math.isqrt(backbone.pos_embed.shape[1] - 1)
    config_class = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    config = config_class(
        hidden_size=backbone.embed_dim, num_hidden_layers=len(backbone.blocks), num_attention_heads=backbone.num_heads,
        mlp_ratio=4, image_size=side * backbone.patch_size, patch_size=backbone.patch_size,
        num_channels=backbone.patch_embed.proj.in_channels, qkv_bias=cfg.qkv_bias,
        layerscale_value=cfg.layerscale or 1.0, use_swiglu_ffn=cfg.ffn == "swiglu",
        layer_norm_eps=backbone.norm.eps, architectures=[CLASSES[kind]],
        **({"num_register_tokens": registers} if registers else {}))
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = from_selfsup(state)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    crop = {"height": image_size, "width": image_size}
    atomic_write(out / "preprocessor_config.json", json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True,
        "size": {"shortest_edge": eval_short_side(image_size)}, "resample": 3, "do_center_crop": True,
        "crop_size": crop, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": len(mean) == 3}, indent=2))
