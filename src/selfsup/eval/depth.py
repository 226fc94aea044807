"""Linear monocular depth on frozen patch features, DINOv2-style (dinov2/eval/depth, DINOv2 Sec. 7.5 'lin.'):
the features upsampled x4, a 1x1 convolution to 256 logits over depth bins spread uniformly between min and max
depth ('UD'), the 'linear' normalisation (ReLU + 0.1, divided by the sum), depth = the bins weighted by those
shares, upsampled bilinearly to the label size. Trained with the scale-invariant log loss plus half the
multi-scale gradient loss; scored per image, then averaged over images, as mmdepth."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core.errors import UserError
from .segment import bilinear, check_pair, fit_head, predict, warmup_factor

N_BINS = 256  # dinov2/hub/depthers.py _make_dinov2_linear_depth_head: classify, 256 'UD' bins, 'linear' norm
UPSAMPLE = 4  # ... upsample=4
LINEAR_EPS = 0.1  # decode_head.py depth_pred, norm_strategy 'linear'
LOG_EPS = 1e-3  # sigloss.py / gradientloss.py: log(depth + 1e-3)
GRAD_WEIGHT = 0.5  # the NYU linear config: SigLoss (weight 1, warm_up) + GradientLoss (weight 0.5)
# the released DINOv2 NYU linear config (as reproduced in Jiawei-Yang/Denoising-ViT
# evaluation/configs/vitb_nyu_linear_config.py): AdamW lr 5e-3, weight decay 0.01, gradients clipped to norm 35,
# cosine annealing to 1e-8 x lr after a linear warm-up from 1e-3 x lr over 12 800 of 38 400 iterations of 16
# images; SigLoss's warm-up (its mean term only) lasts 100 iterations. Shares of the run are kept, not counts.
# Not followed: its OneCycle momentum cycling of Adam's beta1.
LR = 5e-3
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 35.0
WARMUP_SHARE = 12800 / 38400
WARMUP_RATIO = 1e-3
MIN_LR_RATIO = 1e-8
SIG_WARMUP_SHARE = 100 / 38400
BATCH_SIZE = 16
# a step costs ~5x a segmentation step (256 bins at 4x the grid). Measured on 800 images of 64 px with 768-dim
# features whose depth is linear in a feature direction: RMSE 0.30 at 5 epochs, 0.27 at 10 (~26 s on one CPU
# thread), 0.24 at 20 (44 s), against 1.40 for the mean; 10 keeps a run well under a minute
EPOCHS = 10


def depth_metrics(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict:
    """RMSE, AbsRel and delta1 (the share of pixels with max(pred/gt, gt/pred) < 1.25, a fraction 0..1) over
    the valid pixels of each image [N, H, W], then averaged over the images that have valid pixels: mmdepth's
    pre_eval_to_metrics (zhyever/Monocular-Depth-Estimation-Toolbox depth/core/evaluation/metrics.py, the toolbox
    dinov2/eval/depth is built from)."""
    if not (pred.shape == target.shape == valid.shape) or pred.dim() != 3:
        raise UserError(f"prediction, target and valid mask must be [N, H, W] of one shape; got "
                        f"{list(pred.shape)}, {list(target.shape)}, {list(valid.shape)}")
    valid = valid.bool()
    pred, target = pred.double(), target.double()
    if not valid.any():
        raise UserError("no valid depth pixel to score")
    if (target[valid] <= 0).any() or (pred[valid] <= 0).any():
        raise UserError("depths must be positive on the valid pixels (target and prediction)")
    count = valid.sum((1, 2)).double()
    has = count > 0
    t = torch.where(valid, target, torch.ones_like(target))  # placeholders off the valid pixels, masked below
    p = torch.where(valid, pred, torch.ones_like(pred))

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return (v * valid).sum((1, 2))[has] / count[has]

    ratio = torch.maximum(p / t, t / p)
    return {"rmse": float(per_image((p - t) ** 2).sqrt().mean()),
            "abs_rel": float(per_image((p - t).abs() / t).mean()),
            "delta1": float(per_image((ratio < 1.25).double()).mean())}


def rmse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> float:
    """Root mean squared error over the valid pixels of each image [N, H, W], averaged over images (mmdepth)."""
    return depth_metrics(pred, target, valid)["rmse"]


def eval_valid(depth: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """The pixels mmdepth scores: min_depth < depth < max_depth (metrics.py, metrics())."""
    return (depth > min_depth) & (depth < max_depth)


def mean_baseline(train_depth: torch.Tensor, test_depth: torch.Tensor, min_depth: float, max_depth: float) -> float:
    """RMSE of a constant guess: the mean valid (> 0) train depth predicted at every test pixel."""
    mean = train_depth[train_depth > 0].double().mean()
    return rmse(torch.full_like(test_depth, float(mean)), test_depth, eval_valid(test_depth, min_depth, max_depth))


class LinearDepth(nn.Module):
    """DINOv2's linear depth head (dinov2/eval/depth/models/decode_heads/linear_head.py BNHead: despite the name,
    no BatchNorm, which is commented out there): 1x1 conv to n_bins logits, classification over uniform bins."""

    def __init__(self, in_dim: int, min_depth: float, max_depth: float, n_bins: int = N_BINS,
                 upsample: int = UPSAMPLE):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, n_bins, kernel_size=1)  # PyTorch's default init, as the reference
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins))  # 'UD'
        self.upsample = upsample

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """feats [B, D, h, w] -> depth [B, *size]. Always within [min_depth, max_depth] (a convex combination of
        the bins), so the reference's clamp at test time changes nothing and is left out."""
        h, w = feats.shape[-2:]
        # the reference upsamples the features bilinearly before the conv; a 1x1 conv and bilinear interpolation
        # (weights summing to 1) commute, so upsampling the n_bins logits instead gives the same, more cheaply
        share = torch.relu(bilinear(self.conv(feats), (h * self.upsample, w * self.upsample))) + LINEAR_EPS
        depth = (share * self.bins[:, None, None]).sum(1) / share.sum(1)  # sum_k bin_k share_k / sum_k share_k
        return bilinear(depth, size)  # to the label size, as decode_head.py losses() and encode_decode()


def sig_loss(pred: torch.Tensor, target: torch.Tensor, warm_up: bool) -> torch.Tensor:
    """sigloss.py (AdaBins): g = log(pred + eps) - log(gt + eps) over the pixels with gt > 0 of the whole batch;
    sqrt(var(g) + 0.15 mean(g)^2), or sqrt(0.15 mean(g)^2) during its warm-up."""
    valid = target > 0
    if valid.sum() < 2:
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + LOG_EPS) - torch.log(target[valid] + LOG_EPS)
    bias = 0.15 * g.mean() ** 2
    return torch.sqrt(bias if warm_up else g.var() + bias)


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """gradientloss.py (MegaDepth): at strides 1, 2, 4, 6, the absolute differences two pixels apart of the log
    depth error, over pairs of valid (gt > 0) pixels, divided by the valid count. Taken per image over H and W;
    the reference slices the first two dims of its [B, 1, H, W] tensors, i.e. batch and channel."""
    loss = pred.new_zeros(())
    for s in (1, 2, 4, 6):
        p, t = pred[:, ::s, ::s], target[:, ::s, ::s]
        m = t > 0
        n = m.sum()
        if n == 0:
            continue
        d = torch.where(m, torch.log(p + LOG_EPS) - torch.log(t + LOG_EPS), torch.zeros_like(p))
        v = (d[:, :-2] - d[:, 2:]).abs() * (m[:, :-2] & m[:, 2:])
        h = (d[:, :, :-2] - d[:, :, 2:]).abs() * (m[:, :, :-2] & m[:, :, 2:])
        loss = loss + (v.sum() + h.sum()) / n
    return loss


def linear_depth(train_x: torch.Tensor, train_depth: torch.Tensor, test_x: torch.Tensor, test_depth: torch.Tensor,
                 min_depth: float, max_depth: float, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
                 lr: float = LR, device="cpu", seed: int = 0) -> dict:
    """Train a LinearDepth head on x [N, D, h, w] against depth [N, H, W] (0 = invalid) and score it on test
    (pixels with min_depth < depth < max_depth): RMSE, AbsRel, delta1, the constant-guess RMSE `mean_baseline`,
    and the predicted depth [N_test, H, W] for figures."""
    check_pair(train_x, train_depth, test_x, test_depth, "depth")
    if not 0 <= min_depth < max_depth:
        raise UserError(f"depth range must satisfy 0 <= min_depth < max_depth; got {min_depth}, {max_depth}")
    for split, d in (("train", train_depth), ("test", test_depth)):
        if not torch.isfinite(d).all() or (d < 0).any():
            raise UserError(f"{split} depth must be finite and non-negative (0 = invalid)")
    if not (train_depth > 0).any():
        raise UserError("the train depth has no valid (> 0) pixel")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearDepth(train_x.shape[1], min_depth, max_depth)
    size = tuple(train_depth.shape[1:])

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, step: int, total: int) -> torch.Tensor:
        pred = model(xb, size)
        warm = step < round(SIG_WARMUP_SHARE * total)
        return sig_loss(pred, yb, warm) + GRAD_WEIGHT * gradient_loss(pred, yb)

    def factor(step: int, total: int) -> float:  # mmcv 'CosineAnnealing' with min_lr_ratio, after the warm-up
        cos = MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * step / total))
        return cos * warmup_factor(step, max(1, round(WARMUP_SHARE * total)), WARMUP_RATIO)

    fit_head(head, train_x, train_depth, loss_fn, lr, WEIGHT_DECAY, factor, epochs, batch_size, gen, device,
             MAX_GRAD_NORM)
    test_size = tuple(test_depth.shape[1:])
    pred = predict(lambda xb: head(xb, test_size), test_x, batch_size, device)
    return {**depth_metrics(pred, test_depth, eval_valid(test_depth, min_depth, max_depth)),
            "mean_baseline": mean_baseline(train_depth, test_depth, min_depth, max_depth),
            "pred": pred, "epochs": epochs, "lr": lr}
