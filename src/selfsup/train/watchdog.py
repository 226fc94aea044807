"""The collapse watchdog: a method's collapse monitors, watched over the run.

DINO (Sec. 5.3, Fig. 7) names the two collapses of self-distillation: a uniform teacher (entropy h(P_t) -> log K)
and one dominant prototype (h(P_t) -> 0); in both the KL between teacher and student goes to 0. BYOL and
SimCLR collapse to a constant embedding: the spread of their normalised outputs goes to 0. A monitor that
holds for `patience` steps in a row is one warning, with what usually helps.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CollapseCheck:
    """`metric` collapsed when `low <= value <= high`; `what` names the collapse, `helps` what usually helps."""

    metric: str
    low: float
    high: float
    what: str
    helps: str

    def holds(self, metrics: dict[str, float]) -> bool:
        v = metrics.get(self.metric)
        return v is not None and self.low <= v <= self.high


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
    """Counts, per check, the steps in a row it holds; warns once per streak that reaches `patience`."""

    def __init__(self, checks: list[CollapseCheck], patience: int):
        self.checks, self.patience = checks, patience
        self.since: dict[CollapseCheck, int] = {}
        self.warned: set[CollapseCheck] = set()

    def observe(self, step: int, metrics: dict[str, float]) -> CollapseWarning | None:
        fired = None
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


def teacher_checks(log_k: float, share: float = 0.05) -> list[CollapseCheck]:
    """DINO's two collapses on the teacher entropy h(P_t) of K prototypes: within `share` of log K (uniform)
    or of 0 (one prototype)."""
    return [
        CollapseCheck("teacher_entropy", (1 - share) * log_k, float("inf"),
                      f"the teacher is uniform over its prototypes (entropy near log K = {log_k:.2f})",
                      "BatchNorm in the head (dino.use_bn=true), a lower teacher temperature (teacher.temp=0.04), "
                      "fewer prototypes (dino.out_dim=1024), a lower optim.lr"),
        CollapseCheck("teacher_entropy", 0.0, share * log_k,
                      "the teacher puts all its mass on one prototype (entropy near 0)",
                      "keep the centring on, a higher teacher temperature (teacher.temp), a higher "
                      "dino.center_momentum share of new batches, a lower optim.lr"),
    ]


def spread_check(metric: str, dim: int, helps: str) -> CollapseCheck:
    """Normalised embeddings of `dim` dimensions spread with a per-dimension std near 1/sqrt(dim); a constant
    embedding has 0. Collapsed below a tenth of that."""
    return CollapseCheck(metric, 0.0, 0.1 / dim**0.5,
                         f"the embeddings are nearly constant ({metric} below a tenth of 1/sqrt({dim}))", helps)
