"""Optimiser parameter groups: weight decay by each method's reference rule (unless `optim.decay_all`, as MoCo);
layer-wise lr decay (DINOv2: multiplier decay^(L + 1 - layer_id), x0.2 more for the patch embedding; a backbone
continued with fresh heads takes init.layerwise_decay); gradient clipping by each method's reference rule."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..core.errors import UserError
from .lars import LARS

OPTIMIZERS = ("adamw", "lars", "sgd")
TOKENS = ("cls_token", "pos_embed", "register_tokens", "mask_token")
NORMS = (nn.LayerNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def no_weight_decay(name: str, p: nn.Parameter, rule: str, in_norm: bool = False) -> bool:
    """rule "ndim" (DINO, iBOT utils.get_params_groups; SimCLR and BYOL's LARS exclusions): biases and 1-D
    tensors; "names" (DINOv2 utils/param_groups.py): biases, norms and LayerScale gammas. Tokens and position
    embeddings decay under both. `in_norm`: the parameter belongs to a normalisation layer (DINOv2 finds those by
    "norm" in the name, which selfsup's BatchNorm heads lack)."""
    if rule == "ndim":
        return p.ndim <= 1 or name.endswith(".bias")
    return name.endswith(".bias") or "norm" in name or "gamma" in name or in_norm


def layer_id(name: str, n_layers: int) -> int:
    """0 for the patch embedding and tokens, i + 1 for block i, n_layers + 1 for the rest (norm, heads)."""
    if name.startswith("backbone.") and any(t in name for t in TOKENS + ("patch_embed",)):
        return 0
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    return n_layers + 1


def layerwise_decay(cfg: Config) -> float:
    """optim.layerwise_decay; for a backbone continued with fresh heads, init.layerwise_decay unless the recipe
    sets its own."""
    o = cfg.optim
    return cfg.init.layerwise_decay if o.layerwise_decay == 1.0 and cfg.init.mode == "backbone" else o.layerwise_decay


def param_groups(modules: dict[str, nn.Module], cfg: Config, no_decay: str = "ndim") -> list[dict]:
    """One group per (weight decay or not, lr multiplier, backbone or not). Each group carries `wd_mult` and
    `lr_mult`, which the trainer multiplies with the scheduled values at every step, and `backbone`, whose lr a
    continued run holds back (`set_schedule`). `no_decay`: the rule of `no_weight_decay`."""
    o = cfg.optim
    backbone = modules.get("backbone")
    n_layers = len(getattr(backbone, "blocks", [])) if backbone is not None else 0
    decay = layerwise_decay(cfg)
    groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
    for mod_name, module in modules.items():
        normed = {id(p) for m in module.modules() if isinstance(m, NORMS) for p in m.parameters()}
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{name}"
            lr_mult = 1.0
            if decay != 1.0 and n_layers:
                lr_mult = decay ** (n_layers + 1 - layer_id(full, n_layers))
            if "patch_embed" in full:
                lr_mult *= o.patch_embed_lr_mult
            exempt = not o.decay_all and no_weight_decay(full, p, no_decay, id(p) in normed)
            key = (0.0 if exempt else 1.0, lr_mult, mod_name == "backbone")
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "wd_mult": wd, "lr_mult": lr, "backbone": b, "weight_decay": 0.0}
            for (wd, lr, b), ps in groups.items()]


def build_optimizer(modules: dict[str, nn.Module], cfg: Config, device: torch.device,
                    no_decay: str = "ndim") -> torch.optim.Optimizer:
    name = cfg.optim.optimizer
    if name not in OPTIMIZERS:
        raise UserError(f"optim.optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(modules, cfg, no_decay)
    if name == "lars":
        return LARS(groups, lr=0.0)
    if name == "sgd":  # MoCo v2's: SGD with momentum 0.9 (MoCo Sec. 4.1, Chen et al. 2020 MoCo v2)
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    # fused AdamW: one kernel for all parameters, on CUDA and (torch >= 2.4) on the CPU, where it measured
    # 2.4-12x faster than the foreach version for ViT-S (benchmarks/results/fused_adamw.json)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, fused=fused or None)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, backbone: float = 1.0) -> None:
    """The step's lr and weight decay into every group; `backbone` multiplies the backbone's lr (InitConfig)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_mult"] * (backbone if g.get("backbone") else 1.0)
        g["weight_decay"] = weight_decay * g["wd_mult"]


def clip_gradients(modules: dict[str, nn.Module], max_norm: float, mode: str) -> None:
    """Clip the gradients that exist (a frozen last layer under DINO's rule has none). "param": each tensor to
    `max_norm` alone (DINO, iBOT utils.clip_gradients: scale max_norm / (norm + 1e-6) where below 1); "module":
    one norm per network, backbone and each head (DINOv2 train/ssl_meta_arch.py, clip_grad_norm_ per student
    module); "global": one norm over them all."""
    groups = {k: [p for p in m.parameters() if p.grad is not None] for k, m in modules.items()}
    if mode == "param":
        for p in (p for ps in groups.values() for p in ps):  # min(scale, 1): no host sync per tensor
            p.grad.mul_((max_norm / (p.grad.norm(2) + 1e-6)).clamp(max=1.0))
    elif mode == "module":
        for ps in groups.values():
            torch.nn.utils.clip_grad_norm_(ps, max_norm)
    else:
        torch.nn.utils.clip_grad_norm_([p for ps in groups.values() for p in ps], max_norm)
