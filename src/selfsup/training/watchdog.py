"""The collapse watchdog: a method's collapse checks (methods/collapse.py), watched over the run. A check that
holds for `patience` steps in a row is one warning, with what usually helps.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..methods.collapse import CollapseCheck


@dataclass
class CollapseWarning:
    step: int
    since: int  # the first step of the streak
    check: CollapseCheck
    value: float

    def message(self) -> str:
        c = self.check
        return (f"collapse: {c.what} ({c.metric} {self.value:.3g}) since step {self.since}; "
                f"what usually helps: {c.helps}")

    def record(self) -> dict:
        """Its row in metrics.jsonl."""
        return {"step": self.step, "warning": "collapse", "monitor": self.check.metric, "value": self.value,
                "since": self.since, "message": self.message()}


class Watchdog:
    """Counts, per check, the steps in a row it holds on the monitors' moving averages (`smoothing`: the weight
    of the past, 0.9: about 10 steps); warns once per streak that reaches `patience`."""

    def __init__(self, checks: list[CollapseCheck], patience: int, smoothing: float = 0.9):
        self.checks, self.patience, self.smoothing = checks, patience, smoothing
        self.since: dict[CollapseCheck, int] = {}
        self.warned: set[CollapseCheck] = set()
        self.average: dict[str, float] = {}

    def observe(self, step: int, metrics: dict[str, float]) -> CollapseWarning | None:
        for m in {m for c in self.checks for m, _, _ in c.bounds} & metrics.keys():
            old = self.average.get(m, metrics[m])
            self.average[m] = self.smoothing * old + (1 - self.smoothing) * metrics[m]
        metrics, fired = self.average, None
        for c in self.checks:
            if not c.holds(metrics):
                self.since.pop(c, None)
                self.warned.discard(c)
                continue
            first = self.since.setdefault(c, step)
            if step - first + 1 >= self.patience and c not in self.warned:
                self.warned.add(c)
                fired = fired or CollapseWarning(step, first, c, float(metrics[c.metric]))
        return fired

    @property
    def onset(self) -> int | None:
        """The first step of the oldest streak in progress (None when no check holds)."""
        return min(self.since.values(), default=None)
