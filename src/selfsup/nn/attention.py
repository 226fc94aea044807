"""Multi-head self-attention through `scaled_dot_product_attention`, with the backend as one switch, and
sequence packing: groups of sequences of different lengths concatenated along the token axis."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.errors import UserError

BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "math": [SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
}


def check_backend(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise UserError(f"unknown attention backend '{name}' (expected auto, flash, math or efficient)")
    return name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Restrict `scaled_dot_product_attention` to one backend ('flash', 'math', 'efficient'); 'auto' lets
    PyTorch choose. FlashAttention "off" is 'math'."""
    if check_backend(name) == "auto":
        yield
        return
    with sdpa_kernel(BACKENDS[name]):
        yield


def set_attention_backend(model: nn.Module, name: str, device: torch.device | None = None) -> None:
    """The model's switch: every `Attention` in `model` uses this backend from now on, in training and
    evaluation alike (and `torch.compile` recompiles for it, which a context around a compiled call would not)."""
    check_backend(name)
    if name == "efficient" and device is not None and device.type == "cpu":
        raise UserError("attention backend 'efficient' (memory-efficient attention) has no CPU kernel: use flash, "
                        "math or auto on the CPU")
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = name


@dataclass(frozen=True)
class Packing:
    """Groups of same-length sequences packed into one [T, C] token tensor: group i is `shapes[i]` = (B_i, N_i),
    B_i sequences of N_i tokens, stored one after another. Attention is block-diagonal (each sequence attends to
    itself only), computed group by group: no T x T mask, no work outside the diagonal blocks."""

    shapes: tuple[tuple[int, int], ...]

    @staticmethod
    def pack(xs: list[torch.Tensor]) -> tuple[torch.Tensor, "Packing"]:
        """[B_i, N_i, C] tensors -> ([sum B_i N_i, C], their packing)."""
        packing = Packing(tuple((x.shape[0], x.shape[1]) for x in xs))
        flat = [x.flatten(0, 1) for x in xs]
        return (torch.cat(flat) if len(flat) > 1 else flat[0]), packing

    @property
    def sizes(self) -> list[int]:
        return [b * n for b, n in self.shapes]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[T, ...] -> one [B_i * N_i, ...] view per group."""
        return list(x.split(self.sizes)) if len(self.shapes) > 1 else [x]

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[T, C] -> [B_i, N_i, C] views."""
        return [part.view(b, n, -1) for part, (b, n) in zip(self.split(x), self.shapes)]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.backend = "auto"  # see set_attention_backend
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _heads(self, qkv: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """[b * n, 3 C] or [b, n, 3 C] -> q, k, v stacked as [3, b, heads, n, C / heads]."""
        return qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """x: [B, N, C], or packed [T, C] with its `packing`."""
        if packing is None:
            b, n, c = x.shape
            packing, x = Packing(((b, n),)), x.reshape(b * n, c)
            return self.forward(x, packing).view(b, n, c)
        outs = []
        with attention_backend(self.backend):
            for qkv, (b, n) in zip(packing.split(self.qkv(x)), packing.shapes):
                q, k, v = self._heads(qkv, b, n)
                outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, -1))
        return self.proj(torch.cat(outs) if len(outs) > 1 else outs[0])

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) [B, heads, N, N], for visualisation."""
        q, k, _ = self._heads(self.qkv(x), x.shape[0], x.shape[1])
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
