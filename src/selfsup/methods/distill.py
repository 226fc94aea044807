"""Distillation of a smaller student from a frozen pretrained teacher (DINOv2 Sec. 5): the DINOv2 losses with
the teacher fixed, the iBOT loss on the patches of the two global crops (no masking and no stochastic depth
by default), and a spare EMA of the student, which is the model kept at the end."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..config import Config, apply
from ..errors import UserError
from ..train.checkpoint import load_checkpoint
from ..train.schedules import Progress
from .base import Batch, ema_update
from .dinov2 import DINOv2

TEACHER_METHODS = ("dino", "ibot", "dinov2")


def load_teacher(spec: str | None) -> tuple[nn.ModuleDict, Config]:
    """The teacher networks (backbone and heads) of a selfsup dino / ibot / dinov2 run, frozen."""
    from . import build_method

    if not spec:
        raise UserError("distill needs a teacher: distill.teacher=<run folder or checkpoint of a dino, ibot or "
                        "dinov2 run>")
    if not Path(spec).exists():
        raise UserError(f"distill.teacher={spec}: no such run folder or checkpoint (train the teacher first, e.g. "
                        "`selfsup train --method dinov2`, or set distill.teacher=RUN)")
    state = load_checkpoint(spec)
    cfg = Config()
    apply(cfg, state["config"], spec)
    if cfg.method not in TEACHER_METHODS:
        raise UserError(f"distill.teacher={spec}: a '{cfg.method}' run has no DINO heads (expected a run of "
                        f"{', '.join(TEACHER_METHODS)})")
    method = build_method(cfg)
    method.load_state_dict(state["method_state"])
    return method.teacher, cfg  # already frozen (momentum_teacher)


class Distill(DINOv2):
    name = "distill"

    def __init__(self, cfg: Config):
        teacher, tcfg = load_teacher(cfg.distill.teacher)
        if tcfg.backbone.patch_size != cfg.backbone.patch_size:
            raise UserError(f"distill: the student's patch size ({cfg.backbone.patch_size}) must equal the "
                            f"teacher's ({tcfg.backbone.patch_size}) for the patch-level loss")
        cfg = copy.deepcopy(cfg)  # the student's heads take the teacher's prototype counts
        cfg.dino.out_dim = tcfg.dino.out_dim
        cfg.ibot.separate_head = "ibot_head" in teacher
        cfg.ibot.head_n_prototypes = tcfg.ibot.head_n_prototypes
        super().__init__(cfg)
        self.student_ema = self.teacher  # DINO's momentum copy of the student is the spare EMA ...
        self.teacher = teacher  # ... and the teacher is the frozen pretrained one

    def teachers(self) -> list[nn.Module]:
        return [self.teacher, self.student_ema]

    def backbones(self) -> list[nn.Module]:
        return [self.student["backbone"], self.student_ema["backbone"]]

    def backbone(self) -> nn.Module:
        return self.student_ema["backbone"]

    def loss_positions(self, batch: Batch, unmasked: bool = True) -> torch.Tensor:
        """Without masking, the iBOT loss covers every patch of the two global crops."""
        return super().loss_positions(batch, unmasked)

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        ema_update(self.student_ema, self.student, progress.momentum)
