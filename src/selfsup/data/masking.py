"""Block-wise masking of patch grids for masked image modelling (BEiT Alg. 1), by each reference's own rule.

- iBOT (`BlockMasking`; bytedance/ibot loader.py ImageFolderMask): per image, each global crop is masked with
  probability `probability` (pred_ratio [0, 0.3] +- [0, 0.2]: one of the two ratios at random, i.e. 0.5), with a
  target of r * N patches, r ~ U(0.1, 0.5); blocks of at least (min(h, w) // 3)^2 patches and at most what is
  left of the target.
- DINOv2 (`DINOv2Masking`; dinov2/data/collate.py collate_data_and_cast, masking.py MaskingGenerator): per batch
  of n global crops, exactly int(n * probability) are masked, the i-th of them with int(N * U(r_i, r_i+1))
  patches, r = linspace(0.1, 0.5, n_masked + 1), then the crops' order is shuffled; blocks of 4 to 0.5 N patches.

Both place blocks as BEiT does: area ~ U(smallest block, patches left) (the left count capped at the largest
block), aspect ratio log-uniform in [a, 1/a], the block smaller than the grid on both sides, kept when it adds
between 1 and `left` new patches; 10 tries per block. Like both references, a mask stops short of its target
when no block fits any more (a target is an upper bound on the masked count, not an exact count).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """a + (b - a) U(0, 1), for a > b too (Python's random.uniform, which both references call)."""
    return a + (b - a) * rng.random()


def block_mask(rng: np.random.Generator, grid: tuple[int, int], target: float, min_block: float,
               max_block: float = math.inf, min_aspect: float = 0.3) -> np.ndarray:
    """A bool [h, w] mask of at most `target` patches in blocks (ibot loader.py ImageFolderMask.__getitem__,
    dinov2 masking.py MaskingGenerator.__call__ / _mask): add blocks while fewer than `target` are masked."""
    h, w = grid
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    while count < target:
        left = min(target - count, max_block)
        added = 0
        for _ in range(10):
            area = uniform(rng, min_block, left)  # min_block > left near the end: an area in [left, min_block]
            aspect = math.exp(uniform(rng, *log_aspect))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bh < h and bw < w:
                top, side = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                block = mask[top : top + bh, side : side + bw]
                new = bh * bw - int(block.sum())  # overlapping an earlier block is allowed
                if 0 < new <= left:
                    block[:] = True
                    added = new
                    break
        if added == 0:  # no block fits what is left: stop short
            break
        count += added
    return mask


class BlockMasking:
    """iBOT's rule (bytedance/ibot loader.py ImageFolderMask): per image, each global crop independently."""

    def __init__(self, grid: tuple[int, int], n_crops: int, probability: float = 0.5,
                 ratio: tuple[float, float] = (0.1, 0.5), min_aspect: float = 0.3):
        self.grid, self.n_crops, self.probability, self.ratio = grid, n_crops, probability, ratio
        self.min_aspect = min_aspect
        self.min_block = (min(grid) // 3) ** 2  # iBOT: low = (min(H, W) // 3) ** 2

    def __call__(self, rng: np.random.Generator) -> torch.Tensor:
        """Bool masks [n_crops, h, w] of one image's global crops."""
        h, w = self.grid
        masks = np.zeros((self.n_crops, h, w), dtype=bool)
        for c in range(self.n_crops):
            if rng.random() < self.probability:
                target = uniform(rng, *self.ratio) * h * w  # iBOT: high = pred_ratio * H * W, not rounded
                masks[c] = block_mask(rng, self.grid, target, self.min_block, math.inf, self.min_aspect)
        return torch.from_numpy(masks)


class DINOv2Masking:
    """DINOv2's rule (dinov2/data/collate.py collate_data_and_cast): per batch, exactly int(n * probability) of
    its n global crops masked, their ratios stratified over `ratio`, the order shuffled.

    `batch(rng, n_images)` applies it to a batch; calling it with one image's rng applies it to that image's own
    global crops (exactly half of them masked, one ratio bin), which is all a per-image caller can do."""

    def __init__(self, grid: tuple[int, int], n_crops: int, probability: float = 0.5,
                 ratio: tuple[float, float] = (0.1, 0.5), min_aspect: float = 0.3, min_block: int = 4,
                 max_block: float | None = None):
        self.grid, self.n_crops, self.probability, self.ratio = grid, n_crops, probability, ratio
        self.min_aspect, self.min_block = min_aspect, min_block
        # dinov2 train.py: max_num_patches = 0.5 * img_size // patch_size * img_size // patch_size
        self.max_block = 0.5 * grid[0] * grid[1] if max_block is None else max_block

    def batch(self, rng: np.random.Generator, n_images: int) -> torch.Tensor:
        """Bool masks [n_crops * n_images, h, w] of a batch's global crops, crop-major (row c * B + b)."""
        h, w = self.grid
        n = self.n_crops * n_images
        n_masked = int(n * self.probability)
        edges = np.linspace(self.ratio[0], self.ratio[1], n_masked + 1)
        masks = np.zeros((n, h, w), dtype=bool)
        for i in range(n_masked):
            target = int(h * w * uniform(rng, edges[i], edges[i + 1]))
            masks[i] = block_mask(rng, self.grid, target, self.min_block, self.max_block, self.min_aspect)
        return torch.from_numpy(masks[rng.permutation(n)])

    def __call__(self, rng: np.random.Generator) -> torch.Tensor:
        """Bool masks [n_crops, h, w] of one image's global crops: the batch rule over them alone."""
        return self.batch(rng, 1)
