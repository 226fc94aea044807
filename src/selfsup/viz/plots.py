"""Curves of a run (metrics.jsonl), drawn with matplotlib's file-only backend."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

# (title, metric keys drawn together): what `selfsup report` shows when the run logged it
PANELS = (("loss", ("loss",)), ("learning rate", ("lr",)), ("teacher entropy (nats)", ("teacher_entropy",)),
          ("KL(teacher || student) (nats)", ("kl",)), ("k-NN top-1 during training (%)", ("knn_top1",)))


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve(rows: list[dict], title: str, keys: tuple[str, ...], path: Path) -> bool:
    """One panel as a PNG; False (nothing written) when the run logged none of `keys`."""
    lines = [(k, *series(rows, k)) for k in keys]
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for key, x, y in lines:
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, linewidth=1.2, label=key)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
