"""Linear semantic segmentation on frozen patch features, DINOv2-style (dinov2/eval/segmentation, the 'lin.'
and '+ms' heads of DINOv2 Sec. 7.4): BatchNorm and a 1x1 convolution on the patch map, logits upsampled
bilinearly to the label size, cross-entropy with 255 ignored, AdamW with a poly schedule after a linear warm-up;
scored by mIoU as mmseg does (IoU per class over the whole test set, mean over the classes that occur)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError

IGNORE = 255
# the released DINOv2 linear segmentation config (as reproduced in Jiawei-Yang/Denoising-ViT
# evaluation/configs/vitb_voc2012_linear_config.py): AdamW lr 1e-3, weight decay 1e-4, poly (power 1) to 0
# after 1500 linear warm-up iterations from 1e-6 x lr, 40 000 iterations of 16 images (8 GPUs x 2)
LR = 1e-3
WEIGHT_DECAY = 1e-4
WARMUP_SHARE = 1500 / 40000
WARMUP_RATIO = 1e-6
BATCH_SIZE = 16
# 40 000 iterations are far more than ~1000 images of 64 px need. Measured on 800 such images with 768-dim
# features (8 x 8 grid) whose class is the argmax of 5 linear functions: mIoU 88 at 10 epochs, 94 at 20, 96 at
# 30 (~1500 steps, ~10 s on one CPU thread), so 30
EPOCHS = 30


def confusion(pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore: int = IGNORE) -> torch.Tensor:
    """int64 [C, C] pixel counts, rows = target class, columns = predicted class; target pixels equal to
    `ignore` are left out."""
    if pred.shape != target.shape:
        raise UserError(f"prediction {list(pred.shape)} and target {list(target.shape)} must have one shape")
    if n_classes < 1:
        raise UserError(f"n_classes must be at least 1; got {n_classes}")
    keep = target != ignore
    p, t = pred[keep].long(), target[keep].long()
    for name, v in (("prediction", p), ("target", t)):
        if v.numel() and (v.min() < 0 or v.max() >= n_classes):
            raise UserError(f"{name} classes must be in 0..{n_classes - 1} (or {ignore} in the target); got "
                            f"{int(v.min())}..{int(v.max())}")
    return torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).view(n_classes, n_classes).cpu()


def miou(conf: torch.Tensor) -> dict:
    """mmseg's scores from a confusion matrix (rows = target): IoU per class in % (nan for a class absent from
    both target and prediction), their mean over the other classes, and the accuracy over all pixels (%)."""
    if conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        raise UserError(f"a confusion matrix is square [C, C]; got {list(conf.shape)}")
    conf = conf.double()
    if conf.sum() == 0:
        raise UserError("the confusion matrix counts no pixel: every target pixel is ignored")
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    return {"miou": 100.0 * float(iou.nanmean()), "iou": [100.0 * float(v) for v in iou],
            "pixel_acc": 100.0 * float(inter.sum() / conf.sum())}


def interpolation_matrix(n: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """[size, n]: 1-D linear resampling (align_corners=False) of n points to `size` points, as a matrix."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)[:, None]
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0].T


def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x [..., h, w] resized to [..., *size]: F.interpolate(mode="bilinear", align_corners=False) as two matrix
    products (it is separable), whose backward is several times cheaper on the CPU."""
    rows, cols = interpolation_matrix(x.shape[-2], size[0], x), interpolation_matrix(x.shape[-1], size[1], x)
    return rows @ x @ cols.T


class LinearSegmenter(nn.Module):
    """DINOv2's BNHead (dinov2/eval/segmentation/models/decode_heads/linear_head.py): BatchNorm2d over the
    input channels, then mmseg's 1x1 conv_seg to class logits."""

    def __init__(self, in_dim: int, n_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, n_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)  # mmseg BaseDecodeHead.init_weights: normal(0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """feats [B, D, h, w] -> logits [B, C, *size], upsampled bilinearly (align_corners=False, as mmseg)."""
        return bilinear(self.conv(self.bn(feats)), size)


def segmentation_input(patch: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Patch maps [B, L, D, h, w] of L layers and their [CLS] tokens [B, L, D] -> [B, L*2*D, h, w]: per layer,
    the patch map then its [CLS] broadcast over the grid (the order of BNHead's resize_concat of [patch, cls]
    pairs; L = 1 is DINOv2's 'lin.', L = 4 its last-4-layers '+ms' input)."""
    if patch.dim() != 5 or cls.dim() != 3 or patch.shape[:3] != cls.shape:
        raise UserError(f"patch tokens must be [B, L, D, h, w] and [CLS] tokens [B, L, D] with the same B, L, D; "
                        f"got {list(patch.shape)} and {list(cls.shape)}")
    b, layers, d, h, w = patch.shape
    both = torch.stack([patch, cls[..., None, None].expand_as(patch)], dim=2)  # [B, L, 2, D, h, w]
    return both.reshape(b, layers * 2 * d, h, w)


def warmup_factor(step: int, warmup: int, ratio: float) -> float:
    """mmcv's linear warm-up: the multiplier of the scheduled lr, from `ratio` at step 0 to 1 at `warmup`."""
    return 1.0 - (1.0 - step / warmup) * (1.0 - ratio) if step < warmup else 1.0


def fit_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, lr: float, weight_decay: float,
             factor: Callable[[int, int], float], epochs: int, batch_size: int, gen: torch.Generator, device,
             max_grad_norm: float | None = None) -> None:
    """Train `head` on features x [N, D, h, w] (any float dtype, cast to float32 per batch) and targets y with
    AdamW; lr x factor(step, total) at each step; loss_fn(head, xb, yb, step, total) -> scalar."""
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UserError(f"epochs and batch_size must be at least 1 and lr positive; got epochs={epochs}, "
                        f"batch_size={batch_size}, lr={lr}")
    head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * per_epoch
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        idx = order[(step % per_epoch) * batch_size: (step % per_epoch + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * factor(step, total)
        loss = loss_fn(head, x[idx].to(device, torch.float32), y[idx].to(device), step, total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(head.parameters(), max_grad_norm)
        opt.step()
    head.eval()


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """fn over x in batches (cast to float32 on `device`), the outputs concatenated on the CPU."""
    return torch.cat([fn(xb.to(device, torch.float32)).cpu() for xb in x.split(batch_size)])


def check_pair(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
               what: str) -> None:
    """Features [N, D, h, w] and per-pixel targets [N, H, W] of one N per split, one D across splits."""
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.dim() != 4 or y.dim() != 3 or len(x) != len(y) or len(x) == 0:
            raise UserError(f"{split}: features must be [N, D, h, w] and {what} [N, H, W] with one N > 0; got "
                            f"{list(x.shape)} and {list(y.shape)}")
    if train_x.shape[1] != test_x.shape[1]:
        raise UserError(f"train and test features differ in channels: {train_x.shape[1]} vs {test_x.shape[1]}")


def linear_segmentation(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                        n_classes: int, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, lr: float = LR,
                        device="cpu", seed: int = 0) -> dict:
    """Train a LinearSegmenter on x [N, D, h, w] (built by segmentation_input) against labels [N, H, W] (255 =
    ignore) and score it on test: mmseg's mIoU, IoU per class, pixel accuracy (%), and the predicted classes
    [N_test, H, W] for figures."""
    check_pair(train_x, train_y, test_x, test_y, "labels")
    if n_classes < 2:
        raise UserError(f"segmentation needs at least 2 classes; got n_classes={n_classes}")
    bad = (train_y != IGNORE) & ((train_y < 0) | (train_y >= n_classes))
    if bad.any():
        raise UserError(f"train labels must be in 0..{n_classes - 1} or {IGNORE}; found {int(train_y[bad][0])}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearSegmenter(train_x.shape[1], n_classes)
    size = tuple(train_y.shape[1:])

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, step: int, total: int) -> torch.Tensor:
        # mmseg 0.x CrossEntropyLoss (avg_non_ignore=False): summed over labelled pixels, divided by all pixels
        ce = F.cross_entropy(model(xb, size), yb.long(), ignore_index=IGNORE, reduction="sum")
        return ce / yb.numel()

    def factor(step: int, total: int) -> float:  # mmcv 'poly', power 1, min_lr 0, after the linear warm-up
        return (1.0 - step / total) * warmup_factor(step, max(1, round(WARMUP_SHARE * total)), WARMUP_RATIO)

    fit_head(head, train_x, train_y, loss_fn, lr, WEIGHT_DECAY, factor, epochs, batch_size, gen, device)
    test_size = tuple(test_y.shape[1:])
    pred = predict(lambda xb: head(xb, test_size).argmax(1), test_x, batch_size, device)
    return {**miou(confusion(pred, test_y, n_classes)), "pred": pred, "epochs": epochs, "lr": lr}
