"""Block-wise masking of patch grids for masked image modelling (BEiT Alg. 1, as iBOT and DINOv2 use it).

Per global crop: with probability `probability` the crop is masked, and then a share r ~ U(r_min, r_max) of
its patches is covered by random rectangular blocks (aspect ratio log-uniform in [a, 1/a]); otherwise it is
left whole (iBOT: pred_ratio [0, 0.3 +- 0.2]; DINOv2: mask_sample_probability 0.5).
"""
from __future__ import annotations

import math

import numpy as np
import torch


class BlockMasking:
    def __init__(self, grid: tuple[int, int], n_crops: int, probability: float = 0.5,
                 ratio: tuple[float, float] = (0.1, 0.5), min_aspect: float = 0.3):
        self.h, self.w = grid
        self.n_crops, self.probability, self.ratio = n_crops, probability, ratio
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        n = self.h * self.w
        # whole patches only: the masked share of a crop stays within [r_min, r_max]
        self.count_range = (min(math.ceil(ratio[0] * n), n), max(math.floor(ratio[1] * n), 0))
        self.min_block = max(1, (min(self.h, self.w) // 3) ** 2)  # iBOT's smallest block area

    def __call__(self, rng: np.random.Generator) -> torch.Tensor:
        """Bool masks [n_crops, h, w] of one image's global crops."""
        masks = np.zeros((self.n_crops, self.h, self.w), dtype=bool)
        for c in range(self.n_crops):
            if rng.random() < self.probability:
                r = rng.uniform(*self.ratio)
                lo, hi = self.count_range
                masks[c] = self.block_mask(rng, int(np.clip(round(r * self.h * self.w), lo, hi)))
        return torch.from_numpy(masks)

    def block_mask(self, rng: np.random.Generator, target: int) -> np.ndarray:
        """Add blocks until `target` patches are masked (BEiT: each block adds at most what is left, 10 tries
        per block); if no block fits any more, grow the mask one neighbouring patch at a time."""
        mask = np.zeros((self.h, self.w), dtype=bool)
        count = 0
        while count < target:
            added = self.add_block(rng, mask, target - count)
            if added == 0:
                break
            count += added
        while count < target:  # rare: small grids, or a target just above what blocks can fill
            grown = np.zeros_like(mask)
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            free = np.argwhere((grown if count else np.ones_like(mask)) & ~mask)
            if len(free) == 0:
                free = np.argwhere(~mask)
            i, j = free[rng.integers(len(free))]
            mask[i, j] = True
            count += 1
        return mask

    def add_block(self, rng: np.random.Generator, mask: np.ndarray, max_new: int) -> int:
        for _ in range(10):
            area = rng.uniform(min(self.min_block, max_new), max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < bh <= self.h and 0 < bw <= self.w:
                top, left = rng.integers(self.h - bh + 1), rng.integers(self.w - bw + 1)
                block = mask[top : top + bh, left : left + bw]
                new = block.size - int(block.sum())
                if 0 < new <= max_new:
                    block[:] = True
                    return new
        return 0
