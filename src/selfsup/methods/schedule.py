"""What a method declares of its per-step values (teacher temperature, momentum, ...) and what it is handed back
at each step. The trainer builds every declared `Schedule` over the run without knowing its name, with the
run's epoch length and scaling (training/schedules.py), and passes a `Progress` to the method's forward and hooks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

SHAPES = ("cosine", "constant", "first")


def ramp(start: float, end: float, total: int, warmup: int = 0, warmup_start: float = 0.0,
         shape: str = "cosine") -> np.ndarray:
    """`total` values: a linear warm-up from `warmup_start` to `start` over `warmup` steps, then `start` held
    (`constant`, DINO's teacher temperature) or a half cosine from `start` to `end` whose last value is exactly
    `end` (`cosine`, dino utils.cosine_scheduler)."""
    if shape not in ("cosine", "constant"):
        raise ValueError(f"ramp shape must be cosine or constant, got {shape!r}")
    warmup = min(warmup, total)
    head = np.linspace(warmup_start, start, warmup, endpoint=False) if warmup else np.zeros(0)
    n = total - warmup
    if shape == "constant":
        return np.concatenate([head, np.full(n, start)])
    t = np.arange(n) / max(n - 1, 1)
    return np.concatenate([head, end + 0.5 * (start - end) * (1 + np.cos(math.pi * t))])


@dataclass(frozen=True)
class Schedule:
    """A per-step value over a run. `warmup_epochs` and `epochs` are a recipe's epochs, which the trainer turns
    into steps of the run (scaled with its length like every other schedule).
    - `cosine`: a warm-up from `warmup_start`, then a half cosine from `start` to `end`;
    - `constant`: a warm-up from `warmup_start`, then `start` held;
    - `first`: 1.0 during the first `epochs`, 0.0 after (DINO's frozen last layer)."""

    start: float = 0.0
    end: float | None = None
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0
    shape: str = "cosine"
    epochs: float = 0.0

    def values(self, total: int, to_steps: Callable[[float], int]) -> np.ndarray:
        if self.shape == "first":
            return (np.arange(total) < to_steps(self.epochs)).astype(np.float64)
        end = self.start if self.end is None else self.end
        return ramp(self.start, end, total, to_steps(self.warmup_epochs), self.warmup_start, self.shape)


class Progress:
    """Where the run is: the step being taken, its epoch, and the value of each of the method's schedules there
    (`progress.teacher_temp`, `progress.momentum`, ... by the names the method declared)."""

    def __init__(self, step: int, steps_per_epoch: int, values: dict[str, np.ndarray]):
        self.step, self.steps_per_epoch, self._values = step, steps_per_epoch, values

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def __getattr__(self, name: str) -> float:
        values = self.__dict__.get("_values", {})
        if name not in values:
            raise AttributeError(f"no schedule named {name!r}; the method declares {sorted(values)}")
        v = values[name]
        return float(v[min(self.step, len(v) - 1)])

    def values(self) -> dict[str, float]:
        """Every schedule's value at this step, by name (for the metrics)."""
        return {name: getattr(self, name) for name in self._values}
