"""Video object segmentation by label propagation on frozen patch features (DINO's DAVIS 2017 protocol, after
Jabri et al.), and the DAVIS 2017 semi-supervised metrics J (region IoU) and F (boundary F-measure).

Propagation: every target frame's patches take a weighted vote of the labels of their top-k most similar patches
among the first frame (ground truth) and the last n frames (their propagated soft labels), restricted to a square
spatial neighbourhood. The metrics skip the first and last frame of each sequence, and report means over objects."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ..core.errors import UserError


def neighbourhood_mask(h: int, w: int, radius: int) -> torch.Tensor:
    """Bool [h*w, h*w]: True where patch j lies in the (2*radius+1)^2 square window centred on patch i, clipped to
    the grid (dino eval_video_segmentation.py restrict_neighborhood, size_mask_neighborhood = radius)."""
    if h < 1 or w < 1 or radius < 0:
        raise UserError(f"neighbourhood_mask needs h, w >= 1 and radius >= 0, got h={h}, w={w}, radius={radius}")
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def _check_frames(feats: list[torch.Tensor] | torch.Tensor, first_labels: torch.Tensor) -> list[torch.Tensor]:
    frames = list(feats)
    if not frames:
        raise UserError("propagate needs at least one frame of features")
    shape = frames[0].shape
    if len(shape) != 3 or any(f.shape != shape for f in frames):
        raise UserError(f"propagate needs every frame's features as [h, w, D] of one shape, got "
                        f"{[tuple(f.shape) for f in frames]}")
    if first_labels.dim() != 3 or first_labels.shape[1:] != shape[:2]:
        raise UserError(f"first_labels must be [K, {shape[0]}, {shape[1]}] to match the features, "
                        f"got {tuple(first_labels.shape)}")
    return frames


@torch.no_grad()
def propagate(feats: list[torch.Tensor] | torch.Tensor, first_labels: torch.Tensor, n_last: int = 7, topk: int = 5,
              radius: int = 12, temperature: float = 0.1, max_elements: int = 2**24) -> list[torch.Tensor]:
    """Propagate the first frame's labels [K, h, w] through T frames of patch features [h, w, D].

    Returns T soft label maps [K, h, w]: element 0 is `first_labels` itself (as float), element t >= 1 the label
    map propagated to frame t. Defaults follow dino eval_video_segmentation.py: n_last=7 frames in the queue,
    topk=5, radius=12 (0 switches the neighbourhood restriction off, as there), affinity exp(cos / 0.1).
    Affinities are computed per target frame in chunks of target patches of at most `max_elements` values.
    """
    frames = _check_frames(feats, first_labels)
    h, w, _ = frames[0].shape
    n = h * w
    if n_last < 0 or radius < 0 or temperature <= 0 or max_elements < 1:
        raise UserError(f"propagate needs n_last >= 0, radius >= 0, temperature > 0 and max_elements >= 1, got "
                        f"n_last={n_last}, radius={radius}, temperature={temperature}, max_elements={max_elements}")
    if not 1 <= topk <= n:
        raise UserError(f"topk must be between 1 and the {n} patches of a frame, got {topk}")
    labels0 = first_labels.float()
    k_classes = labels0.shape[0]
    # the mask is symmetric, so row i restricts target patch i to its sources
    mask = neighbourhood_mask(h, w, radius).to(frames[0].device) if radius > 0 else None

    def flat(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float().reshape(n, -1), dim=1)

    first = (flat(frames[0]), labels0.reshape(k_classes, n).T)  # ([n, D], [n, K])
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = [labels0]
    for frame in frames[1:]:
        target = flat(frame)
        context = [first] + queue  # the first frame, then the last n_last frames, oldest first
        src = torch.cat([c[0] for c in context])  # [C*n, D]
        src_labels = torch.cat([c[1] for c in context])  # [C*n, K]
        n_ctx = len(context)
        chunk = max(1, max_elements // (n_ctx * n))
        seg = torch.empty(n, k_classes, device=target.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            sim = target[start:stop] @ src.T  # [b, C*n]: target patches (queries) x source patches (keys)
            if mask is not None:
                sim = sim.masked_fill(~mask[start:stop].repeat(1, n_ctx), float("-inf"))
            # dino eval_video_segmentation.py: exp(cos / 0.1), masked entries 0; subtracting each target's maximum
            # first only rescales its column, which the normalisation below removes, and avoids overflow
            aff = torch.exp((sim - sim.amax(dim=1, keepdim=True)) / temperature)
            # keep the top-k sources of each target over all context frames (ties with the k-th kept, as there)
            kth = aff.topk(topk, dim=1).values[:, -1:]
            aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
            aff = aff / aff.sum(dim=1, keepdim=True)
            seg[start:stop] = aff @ src_labels
        if n_last > 0:
            if len(queue) == n_last:
                queue.pop(0)
            queue.append((target, seg))  # the queue keeps the raw propagated soft labels, as the reference
        out.append(seg.T.reshape(k_classes, h, w))
    return out


def _norm_channels(x: torch.Tensor) -> torch.Tensor:
    """Min-max rescale every channel whose maximum is positive (dino eval_video_segmentation.py norm_mask);
    a constant positive channel becomes 0 instead of the reference's 0/0."""
    x = x.clone()
    for c in range(x.shape[0]):
        if x[c].max() > 0:
            x[c] -= x[c].min()
            top = x[c].max()
            if top > 0:
                x[c] /= top
    return x


def _resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL nearest-neighbour resize of a uint8 label map to (H, W), as the reference does for masks."""
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


@torch.no_grad()
def upsample_labels(soft: torch.Tensor, size: tuple[int, int], patch: int | None = None) -> torch.Tensor:
    """Soft label map [K, h, w] -> int64 label map [H, W]: bilinear upsampling (align_corners=False), per-channel
    min-max normalisation, argmax (dino eval_video_segmentation.py). With `patch`, upsample by that factor first
    and resize the argmax to `size` by nearest neighbour, exactly as the reference; without, upsample to `size`."""
    if soft.dim() != 3 or len(size) != 2 or min(size) < 1:
        raise UserError(f"upsample_labels needs soft labels [K, h, w] and a size (H, W), got "
                        f"{tuple(soft.shape)} and {size}")
    if patch is not None and patch < 1:
        raise UserError(f"patch must be a positive integer, got {patch}")
    x = soft.float()[None]
    if patch is None:
        up = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[0]
    else:
        up = F.interpolate(x, scale_factor=patch, mode="bilinear", align_corners=False,
                           recompute_scale_factor=False)[0]
    labels = _norm_channels(up).argmax(dim=0)
    if tuple(labels.shape) != tuple(size):
        if soft.shape[0] > 256:
            raise UserError(f"resizing label maps supports at most 256 labels, got {soft.shape[0]}")
        labels = torch.from_numpy(_resize_nearest(labels.cpu().numpy().astype(np.uint8), size).copy())
    return labels.long().to(soft.device)


def labels_to_patches(mask: torch.Tensor, n_objects: int, patch: int,
                      grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Integer mask [H, W] (0 = background, 1..n_objects) -> one-hot [n_objects + 1, h, w] on the feature grid
    (default H // patch x W // patch): PIL nearest-neighbour resize of the original mask to the grid, then
    one-hot, as the reference's read_seg and to_one_hot."""
    if mask.dim() != 2 or patch < 1 or n_objects < 0:
        raise UserError(f"labels_to_patches needs a mask [H, W], patch >= 1 and n_objects >= 0, got "
                        f"{tuple(mask.shape)}, patch={patch}, n_objects={n_objects}")
    h, w = grid if grid is not None else (mask.shape[0] // patch, mask.shape[1] // patch)
    if h < 1 or w < 1:
        raise UserError(f"a mask of {tuple(mask.shape)} is smaller than one patch of {patch}")
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi > n_objects or n_objects > 255:
        raise UserError(f"mask labels must lie in 0..n_objects={n_objects} (at most 255), found {lo}..{hi}")
    small = torch.from_numpy(_resize_nearest(mask.cpu().numpy().astype(np.uint8), (h, w)).astype(np.int64))
    return F.one_hot(small, n_objects + 1).permute(2, 0, 1).float().to(mask.device)


def _binary(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() != 0


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.dim() != 2 or pred.shape != gt.shape:
        raise UserError(f"pred and gt must be masks [H, W] of one shape, got {tuple(pred.shape)} and "
                        f"{tuple(gt.shape)}")


def region_j(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Region similarity J: IoU of the binary masks (non-zero = foreground); 1 when both are empty
    (davis2017-evaluation davis2017/metrics.py db_eval_iou)."""
    _check_pair(pred, gt)
    p, g = _binary(pred), _binary(gt)
    union = int((p | g).sum())
    return 1.0 if union == 0 else int((p & g).sum()) / union


def _seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel boundary map of a binary mask, offset half a pixel towards the origin (davis2017 _seg2bmap)."""
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    b[-1, :] = seg[-1, :] ^ east[-1, :]
    b[:, -1] = seg[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    """Disk structuring element of the given radius, as skimage.morphology.disk."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def boundary_f(pred: torch.Tensor, gt: torch.Tensor, bound_th: float = 0.008) -> float:
    """Boundary F-measure (davis2017 f_measure): boundaries match within a disk of radius bound_th pixels if
    bound_th >= 1, else ceil(bound_th * image diagonal). 1 when both boundaries are empty, 0 when one is."""
    _check_pair(pred, gt)
    if bound_th <= 0:
        raise UserError(f"bound_th must be positive, got {bound_th}")
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape)))
    fg, gt_b = _seg2bmap(_binary(pred)), _seg2bmap(_binary(gt))
    n_fg, n_gt = int(fg.sum()), int(gt_b.sum())
    if n_fg == 0 or n_gt == 0:
        return 1.0 if n_fg == n_gt else 0.0
    disk = _disk(radius)
    precision = int((fg & ndimage.binary_dilation(gt_b, disk)).sum()) / n_fg
    recall = int((gt_b & ndimage.binary_dilation(fg, disk)).sum()) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def j_and_f(preds: list[torch.Tensor], gts: list[torch.Tensor], n_objects: int) -> dict:
    """One sequence's DAVIS 2017 semi-supervised scores from label maps [H, W] of all its T frames: for each object
    1..n_objects the mean J and F over frames 1..T-2 (the first and last frames are skipped, as davis2017
    evaluation.py), then means over objects. Returns {"j", "f", "jf"} in percent and "objects"."""
    if len(preds) != len(gts) or len(preds) < 3:
        raise UserError(f"j_and_f needs predictions and ground truth for the same T >= 3 frames, got "
                        f"{len(preds)} and {len(gts)}")
    if n_objects < 1:
        raise UserError(f"n_objects must be at least 1, got {n_objects}")
    j_obj, f_obj = [], []
    for obj in range(1, n_objects + 1):
        pairs = [(p == obj, g == obj) for p, g in zip(preds[1:-1], gts[1:-1])]
        j_obj.append(float(np.mean([region_j(p, g) for p, g in pairs])))
        f_obj.append(float(np.mean([boundary_f(p, g) for p, g in pairs])))
    j, f = 100 * float(np.mean(j_obj)), 100 * float(np.mean(f_obj))
    return {"j": j, "f": f, "jf": (j + f) / 2, "objects": n_objects}


def summarise(per_sequence: list[dict]) -> dict:
    """Dataset scores from j_and_f's per-sequence results: J-Mean, F-Mean and J&F-Mean average over all objects
    of all sequences, as the DAVIS benchmark reports them (a sequence weighs by its number of objects)."""
    if not per_sequence:
        raise UserError("summarise needs at least one sequence's results")
    n = sum(s["objects"] for s in per_sequence)
    j = sum(s["j"] * s["objects"] for s in per_sequence) / n
    f = sum(s["f"] * s["objects"] for s in per_sequence) / n
    return {"j": j, "f": f, "jf": (j + f) / 2, "objects": n, "sequences": len(per_sequence)}
