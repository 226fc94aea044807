"""Projection heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear without bias, W = g v / ||v|| per output row (Salimans & Kingma). Keys `weight_g`, `weight_v`
    as in DINO's checkpoints."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # PyTorch's default init of v
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # magnitude g starts at 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """DINO projection head: MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised prototypes.
    `norm_last_layer` freezes g = 1 (DINO Sec. 3.1; main_dino.py). `use_bn` puts a BatchNorm after each hidden
    Linear (main_dino.py's `use_bn_in_head`, off for ViTs in the paper)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers += [nn.BatchNorm1d(hidden_dim), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class ProjectionMLP(nn.Module):
    """The projector / predictor of SimCLR, MoCo and BYOL: n_layers Linear layers, each hidden one followed by
    BatchNorm (if `bn`) and ReLU. `last_bn` ends with a BatchNorm without affine parameters (SimCLR's and
    MoCo v3's projectors); Linear layers followed by BatchNorm have no bias, and with `bias=False` none has
    (MoCo v3's `_build_mlp`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 2, bn: bool = True,
                 last_bn: bool = False, bias: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            last = i == n_layers - 1
            followed_by_bn = (bn and not last) or (last and last_bn)
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias and not followed_by_bn))
            if not last:
                layers += [nn.BatchNorm1d(dims[i + 1])] if bn else []
                layers.append(nn.ReLU(inplace=True))
            elif last_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
