"""Low-shot evaluation (DINO Table 12, iBOT Table 4): a logistic regression on the L2-normalised frozen
features of 1 % and 10 % of the training labels, several seeds, mean +/- std of the test top-1.

As in iBOT's eval_logistic_regression.py: multinomial logistic loss, L2 penalty lambda on the per-sample mean
loss, no intercept; scikit-learn's C is 1 / (n lambda) for that objective. iBOT sweeps lambda in {0.01, 0.1, 1};
on small data those over-regularise (mnist5k, 10 % of the labels: 43 % top-1 at 0.1, 54 % at 1e-4), so the
default here is 1e-4."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def per_class_subset(labels: torch.Tensor, fraction: float, seed: int) -> np.ndarray:
    """A seeded `fraction` of each class (at least one image per class), sorted indices."""
    gen = np.random.default_rng(seed)
    y = labels.numpy()
    picked = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = max(1, int(round(fraction * len(members))))
        picked.append(gen.permutation(members)[:n])
    return np.sort(np.concatenate(picked))


def logistic_top1(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  lambd: float) -> float:
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_train)) < 2:  # one class: every prediction is that class
        return 100.0 * float(np.mean(y_test == y_train[0]))
    clf = LogisticRegression(C=1.0 / (len(y_train) * lambd), fit_intercept=False, max_iter=1000)
    clf.fit(x_train, y_train)
    return 100.0 * float(np.mean(clf.predict(x_test) == y_test))


def lowshot(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
            fractions=(0.01, 0.1), seeds=(0, 1, 2), lambd: float = 1e-4) -> dict:
    """{"1%": {"mean", "std", "runs", "n_labels"}, "10%": ...}: test top-1 in percent over the seeds (sample std)."""
    xtr = F.normalize(train.float(), dim=1).numpy()
    xte = F.normalize(test.float(), dim=1).numpy()
    yte = test_labels.numpy()
    out = {}
    for frac in fractions:
        runs, n = [], 0
        for seed in seeds:
            idx = per_class_subset(train_labels, frac, seed)
            runs.append(logistic_top1(xtr[idx], train_labels.numpy()[idx], xte, yte, lambd))
            n = len(idx)
        std = float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0
        out[f"{100 * frac:g}%"] = {"mean": float(np.mean(runs)), "std": std, "runs": runs, "n_labels": n}
    return out
