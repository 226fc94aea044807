"""MoCo: momentum contrast. v3 by default (Chen, Xie & He, 2021), v2's queue as an option (Chen et al., 2020)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VIT_ARCHS, Config
from ..core.errors import UserError
from ..nn.heads import ProjectionMLP
from ..core import distributed
from .schedule import Progress
from .collapse import CollapseCheck, spread_check
from .base import Batch
from .contrastive import info_nce, info_nce_queue
from .siamese import MomentumSiamese
from .simclr import spread


def in_groups(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int) -> torch.Tensor:
    """`encode` applied to `groups` consecutive parts of the batch, so BatchNorm sees one part at a time (one of
    MoCo's GPUs each)."""
    if groups <= 1:
        return encode(x)
    return torch.cat([encode(part) for part in x.chunk(groups)])


class MoCo(MomentumSiamese):
    """v3 (Alg. 1): q = predictor(projector(f_q(x))), k = projector(f_k(x)) with f_k a momentum encoder;
    loss ctr(q1, k2) + ctr(q2, k1) with the global batch's keys as negatives.
    v2: no predictor, a 2-layer MLP projector without BN, one query view against its key and a queue of K
    negative keys, momentum 0.999, shuffling BN for BatchNorm backbones (recipe moco_v2_imagenet)."""

    name = "moco"
    sections = ("moco",)

    def __init__(self, cfg: Config):
        m = cfg.moco
        if m.version not in (2, 3):
            raise UserError(f"moco.version={m.version}: expected 2 or 3")
        v3 = m.version == 3

        def projector(d: int) -> nn.Module:  # v3: BN in every layer, the last without affine; v2: no BN
            return ProjectionMLP(d, m.hidden_dim, m.out_dim, m.n_layers, bn=v3, last_bn=v3)

        # v3 (builder.py `_build_mlp`): no Linear has a bias; the predictor ends with a BN without affine after a
        # ViT (MoCo_ViT), not after a ResNet (MoCo_ResNet)
        vit_pred = cfg.backbone.arch in VIT_ARCHS
        predictor = (ProjectionMLP(m.out_dim, m.pred_hidden_dim, m.out_dim, 2, last_bn=vit_pred, bias=False) if v3
                     else nn.Identity())
        super().__init__(cfg, projector, predictor)
        # shuffling BN: this rank's share of the groups, each with its own BatchNorm statistics (local_batchnorm:
        # not synchronised across ranks, as on MoCo's GPUs); the keys' permutation is drawn from a generator every
        # rank seeds alike, so ranks agree and any number of ranks trains as one process
        world, per_rank = distributed.world_size(), cfg.optim.batch_size // distributed.world_size()
        self.bn_groups = max(1, m.shuffle_bn // world)
        self.local_batchnorm = m.shuffle_bn > 1
        if self.local_batchnorm and (m.shuffle_bn % world or per_rank < 2 * self.bn_groups):
            raise UserError(f"moco.shuffle_bn={m.shuffle_bn}: expected a multiple of the {world} ranks with 2 images "
                            f"or more in each group of a rank's {per_rank} (lower moco.shuffle_bn)")
        if self.local_batchnorm:
            self.register_buffer("shuffles", torch.zeros((), dtype=torch.long))  # permutations drawn so far
        if not v3:
            if m.queue_size % cfg.optim.batch_size:
                raise UserError(f"moco.queue_size={m.queue_size} must be a multiple of optim.batch_size "
                                f"({cfg.optim.batch_size}), so whole batches enter and leave the queue")
            self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, m.out_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return in_groups(super().online, x, self.bn_groups)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffling BN (MoCo Sec. 3.3): the keys are encoded in groups of the shuffled global batch (gathered from
        every rank, each rank encoding its share), then put back in order."""
        if not self.local_batchnorm:
            return super().target(x)
        generator = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + int(self.shuffles))
        self.shuffles += 1
        x_all = distributed.all_gather(x)
        perm = torch.randperm(x_all.shape[0], generator=generator).to(x.device)
        mine = slice(distributed.rank() * x.shape[0], (distributed.rank() + 1) * x.shape[0])
        k = in_groups(super().target, x_all[perm[mine]], self.bn_groups)
        return distributed.all_gather(k)[torch.argsort(perm)][mine]

    def forward(self, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        m = self.cfg.moco
        if m.version == 3:
            (q1, q2), (k2, k1) = self.views(batch)
            return {"loss": info_nce(q1, k2, m.temperature) + info_nce(q2, k1, m.temperature), "key_std": spread(k2)}
        (q1,), (k2,) = self.views(batch, query=(0,), key=(1,))
        loss = info_nce_queue(q1, k2, self.queue.clone(), m.temperature)  # the queue changes below
        self.enqueue(F.normalize(k2, dim=-1))
        return {"loss": loss, "key_std": spread(k2)}

    def collapse_checks(self) -> list[CollapseCheck]:
        return [spread_check("key_std", self.cfg.moco.out_dim, "a lower optim.lr, a moco.momentum closer to 1, "
                             "a lower moco.temperature")]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """The newest keys of all ranks replace the oldest ones (MoCo Sec. 3.2)."""
        keys = distributed.all_gather(keys)
        ptr, size = int(self.queue_ptr), self.queue.shape[0]
        # whole batches in a run (queue_size is a multiple of the batch); the trainer's trial steps at other
        # batch sizes wrap around
        self.queue[(ptr + torch.arange(keys.shape[0], device=keys.device)) % size] = keys
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)
