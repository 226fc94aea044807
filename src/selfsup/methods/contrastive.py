"""Contrastive losses over the global batch: SimCLR's NT-Xent and MoCo's InfoNCE (in-batch keys or a queue)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import distributed


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR Eq. 1, Alg. 1): z holds this rank's 2n projections, view-major (row v * n + b is view v
    of sample b). Each row's positive is the other view of its sample; its negatives are the other 2N - 2
    rows of the global batch; l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau), averaged over
    the 2N anchors. Gradients flow into every rank's projections (SimCLR's cross-replica negatives)."""
    z = F.normalize(z, dim=-1)
    n2 = z.shape[0]
    z_all = distributed.all_gather_with_grad(z)  # [world * 2n, d], rank-major
    offset = distributed.rank() * n2
    rows = torch.arange(n2, device=z.device)
    logits = z @ z_all.T / temperature
    logits[rows, offset + rows] = float("-inf")  # k != i
    return F.cross_entropy(logits, offset + (rows + n2 // 2) % n2)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ctr(q, k) (Alg. 1): InfoNCE with the keys of the whole global batch as the dictionary; key i
    is the positive of query i. Scaled by 2 tau as in the paper's pseudocode."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    k_all = distributed.all_gather(k)
    logits = q @ k_all.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + distributed.rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo (Eq. 1, Alg. 1): the positive key k_+ against the K negative keys of the queue (normalised rows)."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    l_pos = (q * k).sum(-1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
