"""Clustering of frozen features (iBOT Table 5): k-means with k = the number of classes on L2-normalised
features, scored against the labels by ACC (best one-to-one cluster -> class matching, Hungarian algorithm),
NMI, ARI and FMI, all in percent."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """The fraction of images whose cluster maps to their class under the best one-to-one mapping."""
    from scipy.optimize import linear_sum_assignment

    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    counts = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (c, y), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def cluster_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from sklearn import metrics

    return {"acc": 100 * cluster_accuracy(labels, clusters),
            "nmi": 100 * metrics.normalized_mutual_info_score(labels, clusters),
            "ari": 100 * metrics.adjusted_rand_score(labels, clusters),
            "fmi": 100 * metrics.fowlkes_mallows_score(labels, clusters)}


def kmeans_scores(features: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0) -> dict[str, float]:
    from sklearn.cluster import KMeans

    x = F.normalize(features.float(), dim=1).numpy()
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return cluster_scores(labels.numpy(), clusters)
