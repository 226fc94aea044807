"""Distillation of a smaller student from a frozen pretrained teacher (DINOv2 Sec. 5): the DINOv2 losses with
the teacher fixed, the iBOT loss on the patches of the two global crops (no masking and no stochastic depth
by default), and a spare EMA of the student, which is the model kept at the end."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..config import Config, apply
from ..core.errors import UserError
from . import build_method
from .base import Batch, ema_update
from .dinov2 import DINOv2
from .schedule import Progress

TEACHER_METHODS = ("dino", "ibot", "dinov2")


class Distill(DINOv2):
    name = "distill"
    keeps, keeps_label = "student_ema.backbone", "student EMA"
    sections = ("dino", "teacher", "ibot", "dinov2", "distill")

    def __init__(self, cfg: Config, teacher: nn.ModuleDict):
        """`teacher`: the frozen networks (backbone and heads) of a dino / ibot / dinov2 run (`inputs`)."""
        super().__init__(cfg)
        self.student_ema = self.teacher  # DINO's momentum copy of the student is the spare EMA ...
        self.teacher = teacher  # ... and the teacher is the frozen pretrained one

    @classmethod
    def inputs(cls, cfg: Config, read_run: Callable[[str, str], dict]) -> tuple[Config, dict[str, nn.Module]]:
        """The teacher run named by distill.teacher, frozen, and the config with the student's heads taking the
        teacher's prototype counts (the config saved with the run is the one that built it)."""
        if not cfg.distill.teacher:
            raise UserError("distill needs a teacher: distill.teacher=<run folder or checkpoint of a dino, ibot or "
                            "dinov2 run>")
        state = read_run(cfg.distill.teacher, "distill.teacher")
        tcfg = Config()
        apply(tcfg, state["config"], cfg.distill.teacher)
        if tcfg.method not in TEACHER_METHODS:
            raise UserError(f"distill.teacher={cfg.distill.teacher}: a '{tcfg.method}' run has no DINO heads "
                            f"(expected a run of {', '.join(TEACHER_METHODS)})")
        if tcfg.backbone.patch_size != cfg.backbone.patch_size:
            raise UserError(f"distill: the student's patch size ({cfg.backbone.patch_size}) must equal the "
                            f"teacher's ({tcfg.backbone.patch_size}) for the patch-level loss")
        if tcfg.backbone.in_chans != cfg.backbone.in_chans:
            raise UserError(f"distill: the student's backbone.in_chans ({cfg.backbone.in_chans}) must equal the "
                            f"teacher's ({tcfg.backbone.in_chans}): both see the same crops")
        method = build_method(tcfg)
        method.load_state_dict(state["method_state"])
        teacher = method.teacher  # already frozen (momentum_teacher)
        cfg = copy.deepcopy(cfg)
        cfg.dino.out_dim = tcfg.dino.out_dim
        cfg.ibot.separate_head = "ibot_head" in teacher
        cfg.ibot.head_n_prototypes = tcfg.ibot.head_n_prototypes
        return cfg, {"teacher": teacher}

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
        self.put_back_frozen()
        ema_update(self.student_ema, self.student, progress.momentum)
