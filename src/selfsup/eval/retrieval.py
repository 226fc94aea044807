"""Retrieval on frozen features: every query (test image) ranks the gallery (train images) by cosine
similarity; an image of the same class is relevant. mAP over the full ranking, and recall@k: the fraction of
queries with a relevant image among their k nearest (both in percent)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def retrieval_scores(gallery: torch.Tensor, gallery_labels: torch.Tensor, queries: torch.Tensor,
                     query_labels: torch.Tensor, ks: tuple[int, ...] = (1, 5), max_elements: int = 2**25) -> dict:
    g = F.normalize(gallery.float(), dim=1)
    q = F.normalize(queries.float(), dim=1)
    rank = torch.arange(1, len(g) + 1, device=g.device, dtype=torch.float32)
    chunk = max(1, max_elements // len(g))
    ap_sum, n_ap, hits = 0.0, 0, {k: 0 for k in ks}
    for qs, ql in zip(q.split(chunk), query_labels.split(chunk)):
        order = (qs @ g.T).argsort(dim=1, descending=True)
        relevant = (gallery_labels[order] == ql.unsqueeze(1)).float()  # [b, G], in ranked order
        found = relevant.cumsum(1)
        n_relevant = found[:, -1]
        ap = (found / rank * relevant).sum(1) / n_relevant.clamp_min(1)  # mean precision at each relevant hit
        ap_sum += ap[n_relevant > 0].sum().item()
        n_ap += int((n_relevant > 0).sum())
        for k in ks:
            hits[k] += int((found[:, min(k, len(g)) - 1] > 0).sum())
    out = {"map": 100 * ap_sum / max(n_ap, 1)}
    out.update({f"recall@{k}": 100 * hits[k] / len(q) for k in ks})
    return out
