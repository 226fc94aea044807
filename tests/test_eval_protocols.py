"""Evaluation protocols on fixed feature arrays, against scikit-learn or a plain formula written here."""
import itertools
import math

import numpy as np
import pytest
import torch

from selfsup.eval.cluster import cluster_accuracy, cluster_scores
from selfsup.eval.knn import knn_accuracy, knn_predict
from selfsup.eval.linear import LinearHeads, linear_probe
from selfsup.eval.lowshot import lowshot, per_class_subset
from selfsup.eval.retrieval import retrieval_scores


def blobs(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def train_test(n_train: int, n_test: int, n_classes: int, dim: int, spread: float, seed: int = 0):
    """Train and test features drawn around the same class centres."""
    x, y = blobs(n_train + n_test, n_classes, dim, spread, seed)
    test = (torch.arange(len(y)) % (n_train + n_test)) >= n_train
    return x[~test], y[~test], x[test], y[test]


def test_knn_matches_sklearn_weighted_vote_and_several_k_in_one_search():
    from sklearn.neighbors import KNeighborsClassifier

    xtr, ytr, xte, yte = train_test(30, 10, 4, 8, 1.5, seed=1)
    T = 0.07
    ours = knn_predict(xtr, ytr, xte, 4, [5, 20], T)
    for k in (5, 20):
        # cosine distance d = 1 - cos, so the DINO weight exp(cos / T) is exp((1 - d) / T)
        ref = KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / T))
        ref.fit(xtr.numpy(), ytr.numpy())
        assert (ours[k].argmax(1).numpy() == ref.predict(xte.numpy())).all()
        assert torch.allclose(ours[k], knn_predict(xtr, ytr, xte, 4, k, T))  # one search == separate searches
    table = knn_accuracy(xtr, ytr, xte, yte, [5, 20], T)
    assert table[5]["top1"] == pytest.approx(100 * (ours[5].argmax(1) == yte).float().mean().item())


def test_cluster_accuracy_is_the_best_one_to_one_matching():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    clusters = np.where(rng.random(60) < 0.7, (labels + 1) % 4, rng.integers(0, 4, 60))
    brute = max(np.mean(np.array(p)[clusters] == labels) for p in itertools.permutations(range(4)))
    assert cluster_accuracy(labels, clusters) == pytest.approx(brute)


def pair_counts(labels, clusters):
    n = len(labels)
    same_y = labels[:, None] == labels[None]
    same_c = clusters[:, None] == clusters[None]
    off = ~np.eye(n, dtype=bool)
    tp = (same_y & same_c & off).sum() / 2
    return tp, (same_c & off).sum() / 2, (same_y & off).sum() / 2, n * (n - 1) / 2


def test_nmi_ari_fmi_match_plain_formulas():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 50)
    clusters = np.where(rng.random(50) < 0.6, labels, rng.integers(0, 4, 50))
    s = cluster_scores(labels, clusters)
    tp, pred_pairs, true_pairs, all_pairs = pair_counts(labels, clusters)
    assert s["fmi"] == pytest.approx(100 * tp / math.sqrt(pred_pairs * true_pairs))
    expected = pred_pairs * true_pairs / all_pairs
    assert s["ari"] == pytest.approx(100 * (tp - expected) / ((pred_pairs + true_pairs) / 2 - expected))
    p_y, p_c = np.bincount(labels) / 50, np.bincount(clusters) / 50
    joint = np.zeros((3, 4))
    np.add.at(joint, (labels, clusters), 1 / 50)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(p_y, p_c)[nz])).sum()
    h = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    assert s["nmi"] == pytest.approx(100 * mi / ((h(p_y) + h(p_c)) / 2))  # arithmetic normalisation
    assert cluster_scores(labels, labels) == pytest.approx({"acc": 100, "nmi": 100, "ari": 100, "fmi": 100})


def test_retrieval_map_and_recall_match_sklearn_per_query():
    from sklearn.metrics import average_precision_score

    gallery, gy, queries, qy = train_test(12, 5, 3, 6, 2.0, seed=3)
    r = retrieval_scores(gallery, gy, queries, qy, max_elements=50)  # chunks of a few queries
    g = torch.nn.functional.normalize(gallery, dim=1)
    q = torch.nn.functional.normalize(queries, dim=1)
    sim = (q @ g.T).numpy()
    aps = [average_precision_score(gy.numpy() == qy[i].item(), sim[i]) for i in range(len(q))]
    assert r["map"] == pytest.approx(100 * np.mean(aps), abs=1e-4)
    for k in (1, 5):
        top = np.argsort(-sim, axis=1)[:, :k]
        assert r[f"recall@{k}"] == pytest.approx(100 * np.mean((gy.numpy()[top] == qy.numpy()[:, None]).any(1)))


def test_batched_heads_step_like_torch_sgd_with_one_lr_each():
    lrs = torch.tensor([0.5, 0.01])
    heads = LinearHeads(6, 3, lrs, torch.Generator().manual_seed(0), "cpu")
    refs = [torch.nn.Linear(6, 3) for _ in lrs]
    for i, ref in enumerate(refs):
        ref.weight.data = heads.weight[:, i].detach().T.clone()
        ref.bias.data = heads.bias[i].detach().clone()
    opts = [torch.optim.SGD(r.parameters(), lr=float(lr), momentum=0.9) for r, lr in zip(refs, lrs)]
    x, y = blobs(4, 3, 6, 1.0)
    for factor in (1.0, 0.5, 0.25):
        loss = torch.nn.functional.cross_entropy(heads(x).transpose(1, 2), y.unsqueeze(1).expand(-1, 2), reduction="sum")
        (loss / len(x)).backward()
        heads.sgd_step(factor)
        for r, o, lr in zip(refs, opts, lrs):
            o.param_groups[0]["lr"] = float(lr) * factor
            o.zero_grad()
            torch.nn.functional.cross_entropy(r(x), y).backward()
            o.step()
    for i, r in enumerate(refs):
        assert torch.allclose(heads.weight[:, i].detach().T, r.weight, atol=1e-6)
        assert torch.allclose(heads.bias[i].detach(), r.bias, atol=1e-6)


def test_linear_probe_separates_blobs_and_picks_the_kind_that_carries_the_labels():
    xtr, ytr, xte, yte = train_test(40, 10, 5, 16, 0.5, seed=5)
    noise_tr, noise_te = torch.randn_like(xtr), torch.randn_like(xte)
    r = linear_probe({"signal": xtr, "noise": noise_tr}, ytr, {"signal": xte, "noise": noise_te}, yte, 5,
                     lrs=(1e-4, 0.1), epochs=10, batch_size=64)
    assert r["best"] == "signal" and r["top1"] == 100.0
    assert r["kinds"]["signal"]["lr"] == 0.1  # 1e-4 barely moves the heads in 10 epochs
    assert r["kinds"]["noise"]["top1"] < 60


def test_lowshot_subsets_and_accuracy():
    y = torch.arange(4).repeat_interleave(50)
    idx = per_class_subset(y, 0.1, seed=0)
    assert np.bincount(y[idx].numpy()).tolist() == [5, 5, 5, 5]
    assert len(per_class_subset(y, 0.001, seed=0)) == 4  # at least one image per class
    assert not np.array_equal(idx, per_class_subset(y, 0.1, seed=1))
    xtr, ytr, xte, yte = train_test(50, 10, 4, 8, 0.3, seed=7)
    r = lowshot(xtr, ytr, xte, yte, fractions=(0.02, 0.2), seeds=(0, 1, 2))
    assert r["2%"]["n_labels"] == 4 and r["20%"]["n_labels"] == 40
    assert r["20%"]["mean"] == 100.0 and r["20%"]["std"] == 0.0
    assert r["2%"]["std"] == pytest.approx(np.std(r["2%"]["runs"], ddof=1))
