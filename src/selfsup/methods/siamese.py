"""What BYOL and MoCo v3 share: an online network (backbone, projector, predictor) and a momentum target
network (backbone, projector) that takes no gradient; a loss between the online prediction of one view and
the target projection of the other, symmetrised (BYOL Sec. 3.1, MoCo v3 Alg. 1)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..nn import backbone_from_config, feature_dim
from .schedule import Progress, Schedule
from .base import Batch, Method, ema_update, momentum_schedule, momentum_teacher
from .simclr import two_views


class MomentumSiamese(Method):
    def __init__(self, cfg: Config, projector, predictor: nn.Module):
        """`projector(in_dim)` builds the projector; `predictor` may be nn.Identity()."""
        super().__init__(cfg)
        two_views(cfg, self.name)
        backbone = backbone_from_config(cfg.backbone)
        self.student = nn.ModuleDict({"backbone": backbone, "projector": projector(feature_dim(backbone)),
                                      "predictor": predictor})
        self.teacher = momentum_teacher(self.student, cfg.backbone, parts=("projector",))

    def teachers(self) -> list[nn.Module]:
        return [self.teacher]

    def schedules(self) -> dict[str, Schedule]:
        return {"momentum": momentum_schedule(getattr(self.cfg, self.name))}  # byol.momentum, moco.momentum

    def train(self, mode: bool = True) -> "MomentumSiamese":
        # the target's BatchNorm uses batch statistics, as in BYOL's and MoCo v3's code (its running
        # statistics are never updated by the EMA); it has no drop path
        nn.Module.train(self, mode)
        return self

    def student_modules(self) -> dict[str, nn.Module]:
        return dict(self.student.items())

    def backbone(self) -> nn.Module:
        return self.student["backbone"]  # the online encoder is kept (BYOL Sec. 3.1; MoCo v3: the base encoder)

    def views(self, batch: Batch, query: tuple[int, ...] = (0, 1), key: tuple[int, ...] = (1, 0)
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Online predictions q of the `query` views and target projections k of the `key` views; one view
        at a time, so BatchNorm statistics are per view as in the references."""
        x = batch.global_crops.chunk(2)
        q = [self.online(x[v]) for v in query]
        with torch.no_grad():
            k = [self.target(x[v]) for v in key]
        return q, k

    def online(self, x: torch.Tensor) -> torch.Tensor:
        s = self.student
        return s["predictor"](s["projector"](s["backbone"](x)))

    def target(self, x: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        return t["projector"](t["backbone"](x))

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        ema_update(self.teacher, self.student, progress.momentum)
