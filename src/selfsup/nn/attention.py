"""Multi-head self-attention through `scaled_dot_product_attention`, with the backend as one switch."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import UserError

BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "math": [SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
}


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Restrict `scaled_dot_product_attention` to one backend ('flash', 'math', 'efficient'); 'auto' lets
    PyTorch choose. FlashAttention "off" is 'math'."""
    if name == "auto":
        yield
        return
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend '{name}' (expected auto, flash, math or efficient)")
    with sdpa_kernel(BACKENDS[name]):
        yield


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) [B, heads, N, N], for visualisation."""
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
