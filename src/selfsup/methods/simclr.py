"""SimCLR: a simple framework for contrastive learning of visual representations (Chen et al., 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..core.errors import UserError
from ..nn import backbone_from_config, feature_dim
from ..nn.heads import ProjectionMLP
from .schedule import Progress
from .collapse import CollapseCheck, spread_check
from .base import Batch, Method
from .contrastive import nt_xent


def spread(z: torch.Tensor) -> torch.Tensor:
    """The per-dimension std of the normalised embeddings, averaged: near 0 when every image maps to one point."""
    return F.normalize(z.detach().float(), dim=-1).std(0).mean()


def two_views(cfg: Config, method: str) -> None:
    if cfg.crops.n_global != 2:
        raise UserError(f"{method} compares two views of each image: crops.n_global must be 2 "
                        f"(got {cfg.crops.n_global})")


class SimCLR(Method):
    """f(.) a backbone, g(.) a projection MLP with BatchNorm; NT-Xent on z = g(f(x)) of both views (SimCLR Fig. 2)."""

    name = "simclr"
    sections = ("simclr",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        two_views(cfg, self.name)
        s = cfg.simclr
        backbone = backbone_from_config(cfg.backbone)
        # SimCLR Appendix B.9: BN after every layer of g, the last one without its affine parameters
        projector = ProjectionMLP(feature_dim(backbone), s.hidden_dim, s.out_dim, s.n_layers, last_bn=True)
        self.student = nn.ModuleDict({"backbone": backbone, "projector": projector})

    def student_modules(self) -> dict[str, nn.Module]:
        return dict(self.student.items())

    def backbone(self) -> nn.Module:
        return self.student["backbone"]  # h = f(x) is the representation (SimCLR Sec. 2.1)

    def forward(self, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        # both views in one batch, so the projector's BatchNorm sees all 2N (as SimCLR's code concatenates them)
        z = self.student["projector"](self.student["backbone"](batch.global_crops))
        return {"loss": nt_xent(z, self.cfg.simclr.temperature), "embedding_std": spread(z)}

    def collapse_checks(self) -> list[CollapseCheck]:
        return [spread_check("embedding_std", self.cfg.simclr.out_dim, "a lower optim.lr, a larger batch, a "
                             "lower simclr.temperature")]
