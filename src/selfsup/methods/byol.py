"""BYOL: bootstrap your own latent (Grill et al., 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..nn.heads import ProjectionMLP
from .schedule import Progress
from .collapse import CollapseCheck, spread_check
from .base import Batch
from .siamese import MomentumSiamese
from .simclr import spread


def regression_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """||q/|q| - z/|z|||^2 = 2 - 2 cos(q, z) (BYOL Eq. 2), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(q, z, dim=-1)).mean()


class BYOL(MomentumSiamese):
    """Online q_theta(z_theta) predicts the target's z'_xi of the other view; xi <- tau xi + (1 - tau) theta with
    tau on a cosine from 0.996 to 1 (BYOL Sec. 3.1, 3.2: byol.momentum)."""

    name = "byol"
    sections = ("byol",)

    def __init__(self, cfg: Config):
        b = cfg.byol
        predictor = ProjectionMLP(b.out_dim, b.hidden_dim, b.out_dim) if b.predictor else nn.Identity()
        super().__init__(cfg, lambda d: ProjectionMLP(d, b.hidden_dim, b.out_dim), predictor)

    def forward(self, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        (q1, q2), (z2, z1) = self.views(batch)  # q of views 1, 2; z' of views 2, 1
        loss = regression_loss(q1, z2) + regression_loss(q2, z1)  # L + L~ (BYOL Sec. 3.1, symmetrised)
        return {"loss": loss, "target_std": spread(z1)}  # the target projections' spread

    def collapse_checks(self) -> list[CollapseCheck]:
        return [spread_check("target_std", self.cfg.byol.out_dim, "keep the predictor (byol.predictor=true), a "
                             "lower optim.lr, a byol.momentum closer to 1")]
