"""Batches of multi-crop views, reproducible to the step.

Epoch e visits the source in a permutation seeded with (seed, e); batch b of that epoch is the global batch
perm[b*B : (b+1)*B], of which rank r takes its contiguous share. Together with per-image seeds for the crops,
a run resumed at any step sees exactly the batches an uninterrupted run would, whatever the number of
loader workers or ranks.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..core.errors import UserError
from .shards import ShardBatches
from .sources import Source
from .views import MultiCrop, Views


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class MultiCropBatches(Dataset):
    """Item b is this rank's part of global batch b of the current epoch (the last partial batch is dropped)."""

    def __init__(self, source: Source, multicrop: MultiCrop, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if global_batch % world:
            raise UserError(f"optim.batch_size={global_batch} must be divisible by the number of processes ({world})")
        if len(source) < global_batch:
            raise UserError(f"{source.name}: {len(source)} images, fewer than one batch of {global_batch} "
                            "(lower optim.batch_size)")
        self.source, self.multicrop, self.seed = source, multicrop, seed
        self.global_batch, self.local_batch, self.rank = global_batch, global_batch // world, rank
        self.epoch = 0
        self.perm = epoch_permutation(len(source), seed, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.perm = epoch_permutation(len(self.source), self.seed, epoch)

    def __len__(self) -> int:
        return len(self.source) // self.global_batch

    def indices(self, b: int) -> list[int]:
        start = b * self.global_batch + self.rank * self.local_batch
        return self.perm[start : start + self.local_batch].tolist()

    def __getitem__(self, b: int) -> Views:
        samples = []
        for i in self.indices(b):
            img, label = self.source[i]
            samples.append((img, label, i))
        return self.multicrop(samples, self.epoch)


def make_batches(source: Source, multicrop: MultiCrop, global_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0) -> Dataset:
    """Map-style batches over an indexable source; streamed ones over tar shards."""
    if getattr(source, "streamed", False):
        return ShardBatches(source, multicrop, global_batch, rank, world, seed)
    return MultiCropBatches(source, multicrop, global_batch, rank, world, seed)


def epoch_loader(batches: Dataset, epoch: int, start: int, num_workers: int) -> DataLoader:
    """The batches of `epoch` from batch `start` on."""
    streamed = isinstance(batches, IterableDataset)
    if streamed:  # the batches themselves start at `start`
        batches.set_epoch(epoch, start)
    else:
        batches.set_epoch(epoch)
    return DataLoader(
        batches,
        batch_size=None,
        sampler=None if streamed else range(start, len(batches)),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
