"""Progress of long loops: a tqdm bar on a terminal; otherwise (nohup, SLURM, a pipe) a log line every few
seconds and one when done, so a log file shows how far a job is. Imports nothing of selfsup."""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable

from tqdm import tqdm

log = logging.getLogger("selfsup")


def format_duration(seconds: float) -> str:
    """'<1s', '45s', '3m 20s', '1h 05m' ('?' for an unknown duration)."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s" if s else "<1s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    m = round(seconds / 60)
    return f"{m // 60}h {m % 60:02d}m"


def format_rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 10 else f"{per_s:.1f}"


class ProgressLine:
    """`with ProgressLine(total, "k-NN features mnist5k:train") as p: ... p.update(n)`.

    On a terminal (stderr is a tty, and the "selfsup" logger shows INFO: not on the other ranks of a
    distributed run) a tqdm bar; otherwise INFO lines through the "selfsup" logger, at most one every `every_s`
    seconds while running and one when done (none if the loop raised). A job shorter than `every_s` logs only
    the final line."""

    def __init__(self, total: int, desc: str, unit: str = "img", every_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.every_s, self.clock = total, desc, unit, every_s, clock
        self.n = 0
        self.start = self.last = clock()
        self.bar = None
        if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
            # leave=None: the bar stays unless it is nested (the k-NN inside a training bar)
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=None, dynamic_ncols=True)

    def __enter__(self) -> ProgressLine:
        return self

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s and self.n < self.total:
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            log.info(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({100 * self.n // max(self.total, 1)} %), "
                     f"{format_rate(rate)} {self.unit}/s, ETA {format_duration(eta)}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        elif exc_type is None:
            took = self.clock() - self.start
            log.info(f"{self.desc} done: {self.n:,} {self.unit} in {format_duration(took)} "
                     f"({format_rate(self.n / max(took, 1e-9))} {self.unit}/s)")
