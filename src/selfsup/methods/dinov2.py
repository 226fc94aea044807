"""DINOv2 (Oquab et al., 2023): iBOT with untied heads, Sinkhorn-Knopp targets and the KoLeo regulariser.
LayerScale, SwiGLU, registers and uniform stochastic depth are backbone options (see dinov2_*.yaml)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..core import distributed
from ..core.errors import UserError
from .dino import update_center
from .ibot import IBOT
from .schedule import Progress


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV Sec. 3.1; DINOv2 Sec. 4), in float32: Q = exp(logits / tau)^T
    [K, B] scaled alternately so that each prototype's row sums to 1/K and each sample's column to 1/B; the
    total and the row sums are summed over ranks, B is the global row count. Rows of the result sum to 1.
    The global maximum is subtracted first: Q is rescaled to sum 1 anyway, and exp cannot overflow."""
    logits = logits.float()
    peak = logits.max().reshape(1) if logits.numel() else logits.new_full((1,), float("-inf"))
    q = torch.exp((logits - distributed.all_reduce_max(peak)) / temp).T
    tiny = torch.finfo(q.dtype).tiny
    n_samples = distributed.all_reduce_sum(q.new_full((1,), q.shape[1]))
    n_prototypes = q.shape[0]
    q /= distributed.all_reduce_sum(q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iterations):
        q /= distributed.all_reduce_sum(q.sum(1, keepdim=True)).clamp_min(tiny)
        q /= n_prototypes
        q /= q.sum(0, keepdim=True).clamp_min(tiny)
        q /= n_samples
    return (q * n_samples).T


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al., 2019; DINOv2 Sec. 4): -1/n sum_i log(min_{j != i} ||x_i - x_j||) on
    L2-normalised features, in float32. Finite where the reference is not: 0 for a single sample (no
    neighbour), and a distance of sqrt(|x_i - x_j|^2 + eps^2) keeps duplicates finite with finite gradients."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        n = x.shape[0]
        if n < 2:
            return x.sum() * 0.0
        dots = (x @ x.T).masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))
        nearest = dots.argmax(dim=1)  # the nearest neighbour on the sphere: the largest dot product
        dist = torch.sqrt((x - x[nearest]).pow(2).sum(-1) + eps * eps)
        return -torch.log(dist + eps).mean()


@torch.no_grad()
def update_patch_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """DINOv2's patch centre (ibot_patch_loss.py reduce_center_update / apply_center_update, which
    ssl_meta_arch.py gives the masked rows as one [1, M, K] block): c <- m c + (1 - m) x the mean over ranks of
    each rank's mean of its rows. Ranks without rows are left out (the reference would average in a NaN)."""
    rows = teacher_logits.float().reshape(-1, center.shape[-1])
    has_rows = rows.new_full((1, 1), float(rows.shape[0] > 0))
    local_mean = rows.mean(0, keepdim=True) if rows.shape[0] else rows.new_zeros(1, center.shape[-1])
    total = distributed.all_reduce_sum(torch.cat([local_mean, has_rows], dim=1))  # one all-reduce
    if total[0, -1] > 0:
        center.mul_(momentum).add_(total[:, :-1] / total[0, -1], alpha=1 - momentum)


class DINOv2(IBOT):
    name = "dinov2"
    sections = ("dino", "teacher", "ibot", "dinov2")
    masking_rule = "dinov2"  # ibot.masking=auto (dinov2/data/collate.py collate_data_and_cast)
    clip_mode = "module"  # train/ssl_meta_arch.py: backbone, DINO head and iBOT head each to clip_grad
    no_decay = "names"  # utils/param_groups.py: bias, norm and gamma
    blur_kernel = 9  # data/transforms.py GaussianBlur: torchvision's GaussianBlur(kernel_size=9) (distill too)

    def __init__(self, cfg: Config):
        if cfg.dinov2.centering not in ("sinkhorn_knopp", "centering"):
            raise UserError(f"dinov2.centering={cfg.dinov2.centering}: expected sinkhorn_knopp or centering")
        super().__init__(cfg)
        self.held: list[tuple[nn.Parameter, torch.Tensor]] = []  # frozen prototypes during one step

    def before_optimizer_step(self, progress: Progress) -> None:
        """The frozen prototypes get lr 0 but keep their gradient (dinov2 train.py: last_layer_lr_schedule = 0),
        so Adam's moments accumulate and the gradient counts in the clip norm: the step runs, then `after_step`
        puts the weights back. Exactly lr 0 for AdamW and SGD, whose moments never see the lr (LARS puts it
        inside its momentum: not exact)."""
        self.held = [(p, p.detach().clone()) for p in self.last_layer_params() if p.grad is not None] \
            if progress.freeze_last_layer else []

    @torch.no_grad()
    def put_back_frozen(self) -> None:
        for p, weight in self.held:
            p.copy_(weight)
        self.held = []

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        self.put_back_frozen()
        super().after_step(progress)

    def teacher_probs(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.cfg.dinov2.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.cfg.dinov2.sinkhorn_iterations)
        return super().teacher_probs(logits, center, temp)

    def teacher_patch_logits(self, patch_tokens: torch.Tensor, positions: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv2 (ssl_meta_arch.py get_teacher_output): the teacher's patch head runs on the masked tokens
        only, and the patch centre is updated from those."""
        logits = self.patch_head(self.teacher)(patch_tokens[positions])
        return logits, logits

    def update_centers(self, cls_logits: torch.Tensor, patch_logits: torch.Tensor) -> None:
        """Only with dinov2.centering=centering (Sinkhorn-Knopp has no centre): the [CLS] centre as DINO's, the
        patch centre from the masked rows by DINOv2's rule."""
        if self.cfg.dinov2.centering == "centering":
            update_center(self.center, cls_logits, self.cfg.dino.center_momentum)
            update_patch_center(self.center_patch, patch_logits, self.cfg.ibot.center_momentum)

    def regularisers(self, student_global_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """KoLeo on the backbone's [CLS] before the head, per global crop, summed over the crops (DINOv2
        ssl_meta_arch.py), weight 0.1."""
        w = self.cfg.dinov2.koleo_loss_weight
        if w == 0:
            return {}
        crops = student_global_cls.chunk(self.cfg.crops.n_global)
        return {"koleo": w * sum(koleo_loss(c) for c in crops)}
