"""Per-iteration schedules, precomputed as in DINO's utils.cosine_scheduler.

The epoch counts of a recipe (warm-up 10, teacher-temperature warm-up 30, last layer frozen 1) are written
for a run of `optim.schedule_epochs` epochs (DINO: 100). A run of another length scales them, so a short run
keeps the same shape: 10 % lr warm-up, 30 % temperature warm-up, 1 % frozen last layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import Config, InitConfig, OptimConfig
from ..methods.schedule import Progress, Schedule


def scaled_lr(cfg: Config, world_batch: int) -> float:
    """DINO: lr = base x B / 256 (linear); DINOv2: base x sqrt(B / 1024)."""
    o = cfg.optim
    if o.lr_scaling == "linear":
        return o.lr * world_batch / o.lr_base_batch
    if o.lr_scaling == "sqrt":
        return o.lr * math.sqrt(world_batch / o.lr_base_batch)
    return o.lr


def run_length(o: OptimConfig, steps_per_pass: int) -> tuple[int, int]:
    """(total steps, steps of a schedule epoch). An epoch is a pass over the data, or `optim.epoch_length` steps
    where set (DINOv2 train/train.py: OFFICIAL_EPOCH_LENGTH = 1250 iterations, whatever the data set)."""
    epoch = o.epoch_length or steps_per_pass
    return (o.steps if o.steps else max(1, int(round(o.epochs * epoch)))), epoch


@dataclass
class Schedules:
    """The trainer's own schedules (lr, weight decay) and the method's, by the names it declared."""

    lr: np.ndarray
    weight_decay: np.ndarray
    method: dict[str, np.ndarray]  # Method.schedules(), built over the run
    backbone: np.ndarray  # the backbone's lr multiplier (`continued`)
    first_full_step: int  # the first step at which nothing (a `first` schedule, a frozen backbone) is held back
    steps_per_epoch: int
    total_steps: int
    epoch_scale: float  # run epochs / optim.schedule_epochs

    @classmethod
    def build(cls, cfg: Config, method: dict[str, Schedule], total_steps: int, steps_per_epoch: int) -> "Schedules":
        o = cfg.optim
        run_epochs = total_steps / steps_per_epoch
        scale = run_epochs / o.schedule_epochs if o.schedule_epochs else 1.0
        steps = lambda epochs: to_steps(epochs, scale, steps_per_epoch)  # noqa: E731
        backbone = continued(cfg.init, total_steps)
        return cls(
            lr=Schedule(scaled_lr(cfg, o.batch_size), o.min_lr, o.warmup_epochs).values(total_steps, steps),
            weight_decay=Schedule(o.weight_decay, o.weight_decay_end).values(total_steps, steps),
            method={name: s.values(total_steps, steps) for name, s in method.items()},
            backbone=backbone,
            first_full_step=max([steps(s.epochs) for s in method.values() if s.shape == "first"]
                                + [int((backbone == 0).sum())]),
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            epoch_scale=scale,
        )

    def steps(self, epochs: float) -> int:
        """A recipe's epoch count in steps of this run, scaled like the others."""
        return to_steps(epochs, self.epoch_scale, self.steps_per_epoch)

    def progress(self, step: int) -> Progress:
        return Progress(step, self.steps_per_epoch, self.method)


def to_steps(epochs: float, scale: float, steps_per_epoch: int) -> int:
    return int(round(epochs * scale * steps_per_epoch))


def continued(init: InitConfig, total_steps: int) -> np.ndarray:
    """The backbone's lr multiplier at each step: 1, or for a backbone continued with fresh heads (init.mode
    backbone) 0 through the head warm-up, then a linear ramp from 0 to 1 over the backbone's warm-up (as DINO's
    lr warm-up, utils.cosine_scheduler: np.linspace(0, 1, n))."""
    mult = np.ones(total_steps)
    if init.mode != "backbone":
        return mult
    frozen = min(total_steps, init.head_warmup_steps if init.head_warmup_steps is not None else round(0.1 * total_steps))
    ramp = init.warmup_steps if init.warmup_steps is not None else round(0.05 * total_steps)
    mult[:frozen] = 0.0
    end = min(total_steps, frozen + ramp)
    mult[frozen:end] = np.linspace(0.0, 1.0, ramp)[: end - frozen]
    return mult
