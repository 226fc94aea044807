"""Weighted k-NN classification on frozen features (DINO Sec. 4.1 / Wu et al. 2018): cosine similarity,
the k nearest training features vote for their class with weight exp(s / T); k = 20, T = 0.07."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, n_classes: int,
                k: int | list[int] = 20, temperature: float = 0.07, chunk: int = 1024):
    """Class scores [N_test, n_classes] from the weighted vote of the k nearest training features; for a list
    of k, {k: scores} from one search of the largest k (the nearest neighbours come sorted)."""
    ks = k if isinstance(k, list) else [k]
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k_max = min(max(ks), len(train))
    scores: dict[int, list[torch.Tensor]] = {kk: [] for kk in ks}
    for q in test.split(chunk):
        sim, idx = (q @ train.T).topk(k_max, dim=1)
        w, nearest = (sim / temperature).exp(), train_labels[idx]
        for kk in ks:
            votes = torch.zeros(len(q), n_classes, device=q.device)
            scores[kk].append(votes.scatter_add_(1, nearest[:, :kk], w[:, :kk]))
    table = {kk: torch.cat(s) for kk, s in scores.items()}
    return table if isinstance(k, list) else table[k]


def accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent."""
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels.unsqueeze(1)).any(1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 k: int | list[int] = 20, temperature: float = 0.07) -> dict:
    """Top-1/top-5 for one k, or {k: {...}} for a list of k (one neighbour search)."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train, train_labels, test, n_classes, k, temperature)
    if isinstance(k, list):
        return {kk: accuracy(s, test_labels) for kk, s in scores.items()}
    return accuracy(scores, test_labels)
