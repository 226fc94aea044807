"""What every method shares: the `Method` interface and the momentum (EMA) teacher."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import BackboneConfig, Config, CropsConfig
from ..nn import backbone_from_config
from .collapse import CollapseCheck
from .schedule import Progress, Schedule


@dataclass
class Batch:
    """Augmented views on the training device, crop-major (crop c of sample b is row c * B + b)."""

    global_crops: torch.Tensor  # [n_global * B, C, G, G] (C: backbone.in_chans)
    local_crops: torch.Tensor | None  # [n_local * B, C, L, L]
    masks: torch.Tensor | None  # bool [n_global * B, h, w] (iBOT)
    labels: torch.Tensor
    n_global: int
    n_local: int

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[0] // self.n_global


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- lambda theta_t + (1 - lambda) theta_s (DINO Sec. 3.1), over the parameters both share by
    name (the student may have more, e.g. a predictor)."""
    s_params = dict(student.named_parameters())
    pairs = [(p_t, s_params[n]) for n, p_t in teacher.named_parameters() if n in s_params]
    if not pairs:
        return
    t, s = zip(*pairs)
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def momentum_schedule(section: Any) -> Schedule:
    """An EMA's momentum: a cosine from `section.momentum` to `section.momentum_end` (DINO Sec. 3.1: teacher;
    BYOL Sec. 3.2: byol; MoCo v3: moco, constant in MoCo v2 whose recipe sets both equal)."""
    return Schedule(section.momentum, section.momentum_end)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: a copy that takes no gradient and stays in eval mode (no drop path)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def momentum_teacher(student: nn.ModuleDict, backbone_cfg: BackboneConfig, parts: tuple[str, ...] | None = None
                     ) -> nn.ModuleDict:
    """The momentum teacher / target network: theta_t = theta_s at the start, no drop path, no gradient
    (DINO Sec. 3.1, BYOL Sec. 3.1, MoCo v3 Alg. 1). `parts` picks the student's modules besides the backbone
    (BYOL and MoCo leave the predictor out); default: all of them."""
    backbone = backbone_from_config(backbone_cfg, drop_path=0.0)
    backbone.load_state_dict(student["backbone"].state_dict())
    rest = {k: m for k, m in student.items() if k != "backbone" and (parts is None or k in parts)}
    return frozen_copy(nn.ModuleDict({"backbone": backbone, **rest}))


class Method(nn.Module):
    """A self-supervised method: owns its networks and its loss.

    schedules(): the per-step values it reads from `progress` (teacher temperature, momentum, ...), by name.
    forward(batch, progress) -> named losses and metrics; "loss" is the one optimised.
    before_optimizer_step(progress): what it does to the gradients first (DINO's frozen last layer).
    after_step(progress): EMA teacher and other updates that follow the optimiser step.
    backbone(): the network kept and evaluated.
    """

    name: str = ""
    keeps: str = "student.backbone"  # the state-dict prefix of the network kept and evaluated (`backbone()`)
    keeps_label: str = "backbone"  # what the reports call it
    sections: tuple[str, ...] = ()  # the config sections of its own it reads, saved with its runs
    local_batchnorm: bool = False  # True: BatchNorm stays per rank under torchrun (MoCo's shuffling BN)
    clip_mode: str = "global"  # optim.clip_mode=auto: the reference's gradient clipping (training/optim.clip_gradients)
    blur_kernel: int = 0  # crops.blur_kernel=auto: 0, a Gaussian to ceil(3 sigma) (PIL's GaussianBlur(radius=sigma))
    no_decay: str = "ndim"  # which parameters skip weight decay (training/optim.no_weight_decay)

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def inputs(cls, cfg: Config, read_run: Callable[[str, str], dict]) -> tuple[Config, dict[str, nn.Module]]:
        """The config that builds this method and the networks it is given besides (a distillation's frozen
        teacher). `read_run(spec, key)` is the caller's reader of a run's checkpoint: methods do no I/O."""
        return cfg, {}

    def masking(self, crops: CropsConfig | None = None) -> Callable | None:
        """A mask generator for the global crops (iBOT) of `crops` (default: the config's), or None."""
        return None

    def schedules(self) -> dict[str, Schedule]:
        """The per-step values `progress` carries for this method; the trainer builds them over the run."""
        return {}

    def forward(self, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_optimizer_step(self, progress: Progress) -> None:
        """After backward, before gradient clipping and the optimiser step."""

    def after_step(self, progress: Progress) -> None:
        pass

    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def student_modules(self) -> dict[str, nn.Module]:
        """The trained networks by name (for optimiser groups and gradient clipping)."""
        raise NotImplementedError

    def collapse_checks(self) -> list[CollapseCheck]:
        """The collapse monitors the trainer's watchdog watches in this method's metrics."""
        return []

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for m in self.teachers():
            m.eval()
        return self

    def teachers(self) -> list[nn.Module]:
        return []

    def backbones(self) -> list[nn.Module]:
        """Every copy of the backbone that `--init-from` loads pretrained weights into: the student's and its
        momentum teachers'."""
        return [self.student_modules()["backbone"]] + [t["backbone"] for t in self.teachers()]
