"""DINO: self-distillation with no labels (Caron et al., 2021)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..nn import backbone_from_config, feature_dim
from ..nn.heads import DINOHead
from ..core import distributed
from .schedule import Progress, Schedule
from .collapse import CollapseCheck, teacher_checks
from .base import Batch, Method, ema_update, momentum_schedule, momentum_teacher


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """H(P_t, P_s) summed over pairs (teacher global view i, student view v != i), averaged over the pairs
    and the batch (DINO Eq. 3); P_s = softmax(g_s / tau_s)."""
    total, n_terms = 0.0, 0
    log_ps = [F.log_softmax(s / student_temp, dim=-1) for s in student_logits]
    for i, q in enumerate(teacher_probs):
        for v, log_p in enumerate(log_ps):
            if v == i:
                continue  # the same view on both sides
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            n_terms += 1
    return total / n_terms


def centred_sharpened(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """P_t = softmax((g_t - c) / tau_t): centring and sharpening (DINO Eq. 1, Sec. 3.1)."""
    return F.softmax((teacher_logits - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """c <- m c + (1 - m) (1/B) sum_i g_t(x_i) (DINO Eq. 4), the mean over the rows of all ranks (their counts
    may differ, as iBOT's masked patches do); no update when there are no rows at all."""
    rows = teacher_logits.float().reshape(-1, center.shape[-1])
    count = rows.new_full((1, 1), rows.shape[0])
    total = distributed.all_reduce_sum(torch.cat([rows.sum(0, keepdim=True), count], dim=1))  # one all-reduce
    if total[0, -1] > 0:
        center.mul_(momentum).add_(total[:, :-1] / total[0, -1], alpha=1 - momentum)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the rows of p (nats): the collapse monitor h(P_t) of DINO Fig. 7."""
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()


class DINO(Method):
    name = "dino"
    keeps, keeps_label = "teacher.backbone", "teacher backbone"  # DINO evaluates the teacher
    sections = ("dino", "teacher")
    clip_mode = "param"  # DINO, iBOT utils.clip_gradients: each tensor to clip_grad

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.student = self.build_student()
        self.teacher = momentum_teacher(self.student, cfg.backbone)  # theta_t starts equal to theta_s
        self.register_buffer("center", torch.zeros(1, cfg.dino.out_dim))

    def build_student(self) -> nn.ModuleDict:
        d = self.cfg.dino
        backbone = backbone_from_config(self.cfg.backbone)
        head = DINOHead(feature_dim(backbone), d.out_dim, d.hidden_dim, d.bottleneck_dim, d.n_layers,
                        d.norm_last_layer, d.use_bn)
        return nn.ModuleDict({"backbone": backbone, "head": head})

    def teachers(self) -> list[nn.Module]:
        return [self.teacher]

    def schedules(self) -> dict[str, Schedule]:
        t = self.cfg.teacher
        # tau_t warmed up linearly, then constant (DINO Sec. 4.2, main_dino.py DINOLoss.teacher_temp_schedule);
        # the prototypes frozen for optim.freeze_last_layer_epochs (main_dino.py --freeze_last_layer)
        return {"teacher_temp": Schedule(t.temp, warmup_epochs=t.warmup_temp_epochs, warmup_start=t.warmup_temp,
                                         shape="constant"),
                "momentum": momentum_schedule(t),
                "freeze_last_layer": Schedule(shape="first", epochs=self.cfg.optim.freeze_last_layer_epochs)}

    def before_optimizer_step(self, progress: Progress) -> None:
        """The frozen prototypes' gradient is dropped (dino utils.py cancel_gradients_last_layer): no update, no
        Adam moments, outside the clip norm."""
        if progress.freeze_last_layer:
            for p in self.last_layer_params():
                p.grad = None

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        if mode and self.cfg.dino.use_bn:
            self.teacher["head"].train()  # batch statistics in the teacher's head too, as in main_dino.py
        return self

    def student_modules(self) -> dict[str, nn.Module]:
        return dict(self.student.items())

    def collapse_checks(self) -> list[CollapseCheck]:
        return teacher_checks(math.log(self.cfg.dino.out_dim))

    def last_layer_params(self) -> list[nn.Parameter]:
        """The prototypes: frozen during the first epoch(s)."""
        return list(self.student["head"].last_layer.parameters())

    def backbone(self) -> nn.Module:
        return self.teacher["backbone"]  # DINO evaluates the teacher

    def student_logits(self, batch: Batch) -> list[torch.Tensor]:
        crops = [batch.global_crops] + ([batch.local_crops] if batch.local_crops is not None else [])
        outs = self.student["backbone"].forward_features_list(crops, [None] * len(crops))
        cls = torch.cat([o["x_norm_clstoken"] for o in outs])
        return list(self.student["head"](cls).chunk(batch.n_global + batch.n_local))

    def forward(self, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t_logits = self.teacher["head"](self.teacher["backbone"](batch.global_crops))
            probs = centred_sharpened(t_logits, self.center, progress.teacher_temp)
        s_logits = self.student_logits(batch)
        teacher_probs = list(probs.chunk(batch.n_global))
        loss = dino_loss(s_logits, teacher_probs, self.cfg.dino.student_temp)
        update_center(self.center, t_logits, self.cfg.dino.center_momentum)
        h = entropy(probs)
        return {"loss": loss * self.cfg.dino.loss_weight, "teacher_entropy": h, "kl": loss.detach() - h,
                "teacher_temp": torch.tensor(progress.teacher_temp)}

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        ema_update(self.teacher, self.student, progress.momentum)
