"""Vision Transformer (Dosovitskiy et al.) as DINO and DINOv2 use it.

Module names follow facebookresearch/dinov2 (`patch_embed.proj`, `blocks.{i}.attn.qkv`, `ls1.gamma`,
`mlp.fc1` / `mlp.w12`, `register_tokens`, `mask_token`, ...) so official weights load by their own keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from . import sample_rng
from .attention import Attention, Packing


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int


# DINOv2 layers/vision_transformer.py sizes (vit_giant2: 1536 wide, 40 blocks, 24 heads)
VIT_SIZES = {
    "vit_tiny": ViTSize(192, 12, 3),
    "vit_small": ViTSize(384, 12, 6),
    "vit_base": ViTSize(768, 12, 12),
    "vit_large": ViTSize(1024, 24, 16),
    "vit_giant2": ViTSize(1536, 40, 24),
}


def keep_mask(sizes: Sequence[int], keep: float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample Bernoulli(keep) draws [sum(sizes)] (like's dtype and device) for groups of `sizes` samples. In a
    training step (`sample_rng.sample_streams`) each sample draws by its row in the global batch, so that any
    number of ranks draws what one process does; else from the torch RNG."""
    streams = sample_rng.active()
    if streams is None:
        return like.new_empty(sum(sizes)).bernoulli_(keep)
    return sample_rng.to_device(streams.keep_mask(sizes, keep), like.device).to(like.dtype)


def drop_path(x: torch.Tensor, rate: float, training: bool, packing: Packing | None = None) -> torch.Tensor:
    """Stochastic depth (Huang et al.): drop the residual branch of a whole sample, rescale the rest.
    x: [B, ...], or packed [T, C] tokens whose samples `packing` describes."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    if packing is None:
        mask = keep_mask([x.shape[0]], keep, x).view((x.shape[0],) + (1,) * (x.ndim - 1))
    else:
        tokens = torch.tensor([n for b, n in packing.shapes for _ in range(b)], device=x.device)
        mask = keep_mask([b for b, _ in packing.shapes], keep, x).repeat_interleave(tokens).unsqueeze(-1)
    return x * mask / keep


def sample_subset(packing: Packing, rate: float, device: torch.device) -> tuple[list[torch.Tensor], list[float]]:
    """Efficient stochastic depth (DINOv2 layers/block.py): in each group of B samples keep a random subset of
    k = max(int(B (1 - rate)), 1), whose branch is scaled by B / k so that the sum stays unbiased. Returns the
    kept samples' indices and the scale, per group.

    In a training step (`sample_rng.sample_streams`) B and the subset are those of the group's global batch over
    all ranks, and each rank keeps the kept samples it holds: any number of ranks adds each sample's branch as one
    process does. A rank holding none of them runs the branch on one sample scaled by 0 (adding nothing), so
    that every rank runs the same modules (DDP, FSDP)."""
    streams = sample_rng.active()
    if streams is None:
        kept = [torch.randperm(b, device=device)[: max(int(b * (1.0 - rate)), 1)] for b, _ in packing.shapes]
        return kept, [b / len(k) for (b, _), k in zip(packing.shapes, kept)]
    kept, scales = streams.subset([b for b, _ in packing.shapes], rate)
    return list(sample_rng.to_device(torch.cat(kept), device).split([len(k) for k in kept])), scales


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT), gamma initialised small (DINOv2: 1e-5)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(hidden: int) -> int:
    """DINOv2's SwiGLU width for an MLP `hidden` wide: 2/3 of it, rounded up to a multiple of 8 (ViT-g: 4096)."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    """SwiGLU FFN (Shazeer 2020): w3(silu(x W1) * x W2), `swiglu_hidden` wide."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = swiglu_hidden(hidden)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 layerscale: float | None, ffn: str, eps: float, drop_path_efficient: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = (SwiGLU if ffn == "swiglu" else Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path
        self.drop_path_efficient = drop_path_efficient

    def residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor, Packing], torch.Tensor],
                 packing: Packing) -> torch.Tensor:
        """x + drop_path(branch(x)). Above rate 0.1 (where DINOv2 finds it outweighs its overhead) the branch runs on
        the kept samples only: the dropped ones skip its computation."""
        rate = self.drop_path if self.training else 0.0
        if rate > 0.1 and self.drop_path_efficient:
            kept, scales = sample_subset(packing, rate, x.device)
            c = x.shape[-1]
            groups = [g.view(b, -1) for g, (b, _) in zip(packing.split(x), packing.shapes)]  # 2-D: fast indexing
            subset = Packing(tuple((len(k), n) for k, (_, n) in zip(kept, packing.shapes)))
            rows = [g[k].view(-1, c) for g, k in zip(groups, kept)]
            ys = subset.split(branch(torch.cat(rows) if len(rows) > 1 else rows[0], subset).to(x.dtype))
            # out-of-place index_put: measured faster than index_add on this CPU, forward and backward
            out = [torch.index_put(g, (k,), y.view(len(k), -1) * s, accumulate=True).view(-1, c)
                   for g, k, y, s in zip(groups, kept, ys, scales)]
            return torch.cat(out) if len(out) > 1 else out[0]
        return x + drop_path(branch(x, packing), rate, self.training, packing)

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """x: [B, N, C], or packed [T, C] tokens with their `packing`."""
        if packing is None:
            b, n, c = x.shape
            return self.forward(x.reshape(b * n, c), Packing(((b, n),))).view(b, n, c)
        x = self.residual(x, lambda y, p: self.ls1(self.attn(self.norm1(y), p)), packing)
        return self.residual(x, lambda y, p: self.ls2(self.mlp(self.norm2(y))), packing)


def sincos_pos_embed(side: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding (vits.py `build_2d_sincos_position_embedding`) for a
    side x side patch grid, [1, 1 + side^2, dim]: zeros at [CLS], then for the patch in row r and column c (tokens
    row-major) [sin(r w), cos(r w), sin(c w), cos(c w)], w_i = temperature^(-i / (dim / 4)) for i < dim / 4."""
    if dim % 4:
        raise UserError(f"a sin-cos position embedding needs a width divisible by 4 (this ViT is {dim} wide)")
    quarter = dim // 4
    freqs = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    cell = torch.arange(side * side, dtype=torch.float32)
    row, col = torch.outer(cell.div(side, rounding_mode="floor"), freqs), torch.outer(cell % side, freqs)
    patches = torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), patches]).unsqueeze(0)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn: str = "mlp",
        layerscale: float | None = None,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        n_registers: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        eps: float = 1e-6,
        in_chans: int = 3,
        drop_path_efficient: bool = True,
        packing: bool = True,
        pos_embed: str = "learned",
        freeze_patch_embed: bool = False,
    ):
        super().__init__()
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.n_registers = n_registers
        self.packing = packing  # forward_features_list: one packed forward for all groups of crops
        self.interpolate_antialias, self.interpolate_offset = interpolate_antialias, interpolate_offset
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        # MoCo v3's stop-grad-conv1: the patch projection stays at its random init
        self.patch_embed.proj.requires_grad_(not freeze_patch_embed)
        n_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed not in ("learned", "sincos"):
            raise UserError(f"pos_embed={pos_embed!r}: expected learned or sincos")
        # sincos: fixed (MoCo v3), a Parameter without gradient under the same key as a learned one, so checkpoints,
        # exports and official weights keep their names and the resize below serves both
        self.pos_embed_kind = pos_embed
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, embed_dim), requires_grad=pos_embed == "learned")
        self.register_tokens = nn.Parameter(torch.zeros(1, n_registers, embed_dim)) if n_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # DINO: rate linear over depth; DINOv2: uniform (plain Python, so the model also builds on the meta device)
        rates = [drop_path_rate * (1.0 if drop_path_uniform else i / max(depth - 1, 1)) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r, layerscale, ffn, eps, drop_path_efficient)
            for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed_kind == "sincos":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(math.isqrt(self.pos_embed.shape[1] - 1), self.embed_dim))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)  # DINOv2
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """The position embedding for an h x w image: bicubic resize of the patch grid (DINOv2 semantics:
        scale factor (n + offset) / M, or antialiased resize to size when offset is 0), learned or sin-cos alike."""
        pos = self.pos_embed
        n_grid = pos.shape[1] - 1
        h0, w0 = h // self.patch_size, w // self.patch_size
        m = int(math.sqrt(n_grid))
        if h0 * w0 == n_grid and h == w:  # as the reference: resample unless square in pixels
            return pos
        patch = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            sh, sw = (h0 + self.interpolate_offset) / m, (w0 + self.interpolate_offset) / m
            patch = F.interpolate(patch, scale_factor=(sh, sw), mode="bicubic", antialias=self.interpolate_antialias)
        else:
            patch = F.interpolate(patch, size=(h0, w0), mode="bicubic", antialias=self.interpolate_antialias)
        assert patch.shape[-2:] == (h0, w0)
        patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], patch.to(pos.dtype)], dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """[CLS] + registers + patch tokens. Masked patches (iBOT) take the mask token before the position
        embedding is added; registers come after it and carry no position (DINOv2)."""
        b, _, h, w = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(masks.flatten(1).unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.interpolate_pos_encoding(h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        return x

    def _outputs(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor]:
        xn = self.norm(x)
        r = 1 + self.n_registers
        return {
            "x_norm_clstoken": xn[:, 0],
            "x_norm_regtokens": xn[:, 1:r],
            "x_norm_patchtokens": xn[:, r:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._outputs(x, masks)

    def forward_features_list(self, xs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> list[dict]:
        """Several groups of crops (e.g. global and local) in one packed forward (their tokens concatenated,
        attention block-diagonal), or one forward per group when `self.packing` is off. Same results."""
        if not self.packing or len(xs) == 1:
            return [self.forward_features(x, m) for x, m in zip(xs, masks)]
        x, packing = Packing.pack([self.prepare_tokens(x, m) for x, m in zip(xs, masks)])
        for blk in self.blocks:
            x = blk(x, packing)
        return [self._outputs(t, m) for t, m in zip(packing.unpack(x), masks)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised [CLS] token, the image's feature."""
        return self.forward_features(x)["x_norm_clstoken"]

    def intermediate_outputs(self, x: torch.Tensor, n: int | Sequence[int] = 1) -> list[dict[str, torch.Tensor]]:
        """`_outputs` (normalised [CLS], registers, patches, pre-norm tokens) of the last `n` blocks, or of the
        blocks whose indices `n` lists."""
        take = set(range(len(self.blocks) - n, len(self.blocks))) if isinstance(n, int) else set(n)
        if not take or min(take) < 0 or max(take) >= len(self.blocks):
            raise ValueError(f"blocks {sorted(take)} requested of a {len(self.blocks)}-block ViT")
        x = self.prepare_tokens(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                outs.append(self._outputs(x, None))
        return outs

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """DINOv2's interface (dinov2/models/vision_transformer.py), for dense code written against torch.hub's
        models: the patch tokens of the last `n` blocks (or of the blocks listed), [B, N, D], or [B, D, h, w]
        with `reshape`; with `return_class_token`, (patch tokens, [CLS] [B, D]) pairs. Registers are left out."""
        outs = self.intermediate_outputs(x, n)
        r = 1 + self.n_registers
        tokens = [self.norm(o["x_prenorm"]) if norm else o["x_prenorm"] for o in outs]
        patches = [t[:, r:] for t in tokens]
        if reshape:
            b, _, h, w = x.shape
            gh, gw = h // self.patch_size, w // self.patch_size
            patches = [p.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, [t[:, 0] for t in tokens]))
        return tuple(patches)

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block [B, heads, N, N] (token order: [CLS], registers, patches)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.attention_map(self.blocks[-1].norm1(x))


def require_vit(backbone: nn.Module, what: str) -> VisionTransformer:
    """`backbone` if it is a ViT, else a UserError saying that `what` needs patch tokens and self-attention."""
    if not isinstance(backbone, VisionTransformer):
        raise UserError(f"{what} needs a ViT backbone (patch tokens and self-attention); this one is "
                        f"{type(backbone).__name__}")
    return backbone


def vit(arch: str, patch_size: int = 16, depth: int | None = None, **kwargs) -> VisionTransformer:
    size = VIT_SIZES[arch]
    return VisionTransformer(patch_size=patch_size, embed_dim=size.embed_dim, depth=depth or size.depth,
                             num_heads=size.num_heads, **kwargs)


def xavier_init_(model: VisionTransformer) -> VisionTransformer:
    """MoCo v3's ViT init (vits.py `VisionTransformerMoCo`), in place: Linears Xavier-uniform, the qkv Linear's
    bound taken as for one of its three [D, D] matrices, sqrt(6 / (D + D)); the patch projection Xavier-uniform as
    the Linear from in_chans * p * p pixels to D it is; zero biases. Tokens and position embedding stay as built."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6.0 / ((fan_out // 3 if name.endswith("attn.qkv") else fan_out) + fan_in))
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = model.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    return model
