"""Per-iteration schedules, precomputed as in DINO's utils.cosine_scheduler.

The epoch counts of a recipe (warm-up 10, teacher-temperature warm-up 30, last layer frozen 1) are written
for a run of `optim.schedule_epochs` epochs (DINO: 100). A run of another length scales them, so a short run
keeps the same shape: 10 % lr warm-up, 30 % temperature warm-up, 1 % frozen last layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import Config, OptimConfig


def cosine(start: float, end: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `start` over `warmup` steps, then a half cosine from `start` to
    `end` over the remaining steps; the last value is exactly `end`."""
    warmup = min(warmup, total)
    ramp = np.linspace(warmup_start, start, warmup, endpoint=False) if warmup else np.zeros(0)
    n = total - warmup
    t = np.arange(n) / max(n - 1, 1)
    return np.concatenate([ramp, end + 0.5 * (start - end) * (1 + np.cos(math.pi * t))])


def warmup_constant(start: float, end: float, total: int, warmup: int) -> np.ndarray:
    """Linear from `start` to `end` over `warmup` steps, then constant (DINO's teacher temperature)."""
    warmup = min(warmup, total)
    return np.concatenate([np.linspace(start, end, warmup, endpoint=False) if warmup else np.zeros(0),
                           np.full(total - warmup, end)])


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
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray  # teacher EMA momentum lambda
    teacher_temp: np.ndarray
    freeze_last_layer_steps: int
    steps_per_epoch: int
    total_steps: int
    epoch_scale: float  # run epochs / optim.schedule_epochs

    @classmethod
    def build(cls, cfg: Config, total_steps: int, steps_per_epoch: int) -> "Schedules":
        o, t = cfg.optim, cfg.teacher
        run_epochs = total_steps / steps_per_epoch
        scale = run_epochs / o.schedule_epochs if o.schedule_epochs else 1.0
        steps = lambda epochs: to_steps(epochs, scale, steps_per_epoch)  # noqa: E731
        return cls(
            lr=cosine(scaled_lr(cfg, o.batch_size), o.min_lr, total_steps, steps(o.warmup_epochs)),
            weight_decay=cosine(o.weight_decay, o.weight_decay_end, total_steps),
            momentum=cosine(t.momentum, t.momentum_end, total_steps),
            teacher_temp=warmup_constant(t.warmup_temp, t.temp, total_steps, steps(t.warmup_temp_epochs)),
            freeze_last_layer_steps=steps(o.freeze_last_layer_epochs),
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            epoch_scale=scale,
        )

    def steps(self, epochs: float) -> int:
        """A recipe's epoch count in steps of this run, scaled like the others."""
        return to_steps(epochs, self.epoch_scale, self.steps_per_epoch)


def to_steps(epochs: float, scale: float, steps_per_epoch: int) -> int:
    return int(round(epochs * scale * steps_per_epoch))


@dataclass
class Progress:
    """Where the run is: the step being taken and the schedules' values there."""

    step: int
    schedules: Schedules

    @property
    def epoch(self) -> float:
        return self.step / self.schedules.steps_per_epoch

    @property
    def teacher_temp(self) -> float:
        return float(self.schedules.teacher_temp[min(self.step, self.schedules.total_steps - 1)])

    @property
    def momentum(self) -> float:
        return float(self.schedules.momentum[min(self.step, self.schedules.total_steps - 1)])
