"""Per-sample randomness of a training step that the number of ranks does not change (stochastic depth).

A step on one process with a batch of B images and a step on W ranks with B / W each must draw the same random
numbers for the same image. So per-sample draws are not taken from the torch RNG, which every rank seeds alike
(its B / W samples would draw what the first B / W samples of the one-process batch draw), but from a stream
that `SampleStreams` hands out: seeded by the step's seed and a count of the streams handed out in the step (the
same on every rank, which all run the same forward), the stream draws for the *global* batch and each rank takes
the rows of its own samples. Streams draw on the CPU, so CPU and GPU runs draw alike; only what a rank needs
moves to its device.

Rows are those of a group of crops, crop-major as the loader builds them (`data/views.py`: crop c of image i is
row c * b + i on a rank holding b images): local row c * b + i of rank r is global row c * B + r * b + i of the
group's n_crops * B. Outside a `sample_streams` context (a model used on its own, evaluation) callers fall back
to the torch RNG, as one process with offset 0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch


@dataclass
class SampleStreams:
    seed: int  # the step's seed
    batch: int  # images on this rank (b)
    rank: int = 0
    world: int = 1
    draws: int = 0  # streams handed out so far in this step

    def generator(self) -> torch.Generator:
        """The next stream of the step (a CPU generator), the same on every rank."""
        state = np.random.SeedSequence([self.seed, self.draws]).generate_state(1, np.uint64)
        self.draws += 1
        return torch.Generator().manual_seed(int(state[0]) >> 1)

    def rows(self, n: int) -> tuple[torch.Tensor, int]:
        """(the global rows of this rank's n local rows of a group [n], the group's global row count). A group of
        n_crops * b rows is crop-major; any other count is taken as one block per rank, in rank order."""
        b = self.batch
        if b > 0 and n % b == 0:
            crops, total = n // b, self.world * b
            rows = torch.arange(crops).unsqueeze(1) * total + self.rank * b + torch.arange(b)
            return rows.flatten(), crops * total
        return self.rank * n + torch.arange(n), self.world * n

    # drawn eagerly under torch.compile (generators and host-side sizes): one graph break per draw
    @torch.compiler.disable
    def keep_mask(self, sizes: Sequence[int], keep: float) -> torch.Tensor:
        """Bernoulli(keep) bools [sum(sizes)] for this rank's samples of groups of `sizes` local rows, from one
        stream: each group draws for its global rows, this rank takes its own."""
        g = self.generator()
        masks = []
        for n in sizes:
            rows, total = self.rows(n)
            masks.append(torch.rand(total, generator=g)[rows] < keep)
        return torch.cat(masks)

    @torch.compiler.disable
    def subset(self, sizes: Sequence[int], rate: float) -> tuple[list[torch.Tensor], list[float]]:
        """Efficient stochastic depth over the global batch: per group of `sizes` local rows, a random k =
        max(int(N (1 - rate)), 1) of the group's N global rows are kept, scaled by N / k; returns (the kept rows
        this rank holds, as local indices, the scale) per group. Where this rank holds none: its row 0, scale 0."""
        g = self.generator()
        kept, scales = [], []
        for n in sizes:
            rows, total = self.rows(n)
            k = max(int(total * (1.0 - rate)), 1)
            local = torch.full((total,), -1, dtype=torch.long)
            local[rows] = torch.arange(n)
            mine = local[torch.randperm(total, generator=g)[:k]]
            mine = mine[mine >= 0]
            empty = len(mine) == 0 and n > 0
            kept.append(torch.zeros(1, dtype=torch.long) if empty else mine)
            scales.append(0.0 if empty else total / k)
        return kept, scales


_active: SampleStreams | None = None


def active() -> SampleStreams | None:
    """The streams of the step being run, None outside `sample_streams`."""
    return _active


@contextlib.contextmanager
def sample_streams(seed: int, batch: int, rank: int = 0, world: int = 1) -> Iterator[SampleStreams]:
    """Per-sample draws inside come from streams seeded by `seed`, by each sample's row in the global batch of
    `world` ranks holding `batch` images each (this one being `rank`)."""
    global _active
    previous, _active = _active, SampleStreams(seed, batch, rank, world)
    try:
        yield _active
    finally:
        _active = previous


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
