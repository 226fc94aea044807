"""What a method declares to the collapse watchdog (training/watchdog.py): the bounds within which its metrics say
it has collapsed.

DINO (Sec. 5.3, Fig. 7) names the two collapses of self-distillation: a uniform teacher (entropy h(P_t) -> log K)
and one dominant prototype (h(P_t) -> 0); in both the KL between teacher and student goes to 0. BYOL and
SimCLR collapse to a constant embedding: the spread of their normalised outputs goes to 0.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CollapseCheck:
    """Collapsed when every metric lies within its bounds, `bounds` = ((metric, low, high), ...); the first is the
    one reported. `what` names the collapse, `helps` what usually helps."""

    bounds: tuple[tuple[str, float, float], ...]
    what: str
    helps: str

    @property
    def metric(self) -> str:
        return self.bounds[0][0]

    def holds(self, metrics: dict[str, float]) -> bool:
        return all(m in metrics and low <= metrics[m] <= high for m, low, high in self.bounds)


def teacher_checks(log_k: float) -> list[CollapseCheck]:
    """DINO's two collapses on the teacher entropy h(P_t) of K prototypes: uniform (h above 0.95 log K while the
    KL between teacher and student is below 0.03 log K: the student has nothing left to learn) or one prototype
    (h below 0.05 log K). Measured on MNIST and photos: stuck runs have KL 0.001-0.2 (K = 1024-4096), healthy
    ones 0.25 and more, and a nearly flat but learning DINOv2 teacher h = 0.945 log K."""
    return [
        CollapseCheck((("teacher_entropy", 0.95 * log_k, float("inf")), ("kl", float("-inf"), 0.03 * log_k)),
                      f"the teacher is uniform over its prototypes (entropy near log K = {log_k:.2f}, KL near 0)",
                      "BatchNorm in the head (dino.use_bn=true), a lower teacher temperature (teacher.temp=0.04), "
                      "fewer prototypes (dino.out_dim=1024), a lower optim.lr"),
        CollapseCheck((("teacher_entropy", 0.0, 0.05 * log_k),),
                      "the teacher puts all its mass on one prototype (entropy near 0)",
                      "keep the centring on, a higher teacher temperature (teacher.temp), a lower "
                      "dino.center_momentum, a lower optim.lr"),
    ]


def spread_check(metric: str, dim: int, helps: str) -> CollapseCheck:
    """Normalised embeddings of `dim` dimensions spread with a per-dimension std near 1/sqrt(dim); a constant
    embedding has 0. Collapsed below a tenth of that."""
    return CollapseCheck(((metric, 0.0, 0.1 / dim**0.5),),
                         f"the embeddings are nearly constant ({metric} below a tenth of 1/sqrt({dim}))", helps)
