"""Weighted k-NN classification on frozen features (DINO Sec. 4.1 / Wu et al. 2018): cosine similarity,
the k nearest training features vote for their class with weight exp(s / T); k = 20, T = 0.07."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, n_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N_test, n_classes] from the weighted vote of the k nearest training features."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for q in test.split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = torch.zeros(len(q), n_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], w)
        scores.append(votes)
    return torch.cat(scores)


def accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent."""
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels.unsqueeze(1)).any(1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return accuracy(knn_predict(train, train_labels, test, n_classes, k, temperature), test_labels)
