"""Linear probe on frozen features, DINOv2-style (dinov2/eval/linear.py): one linear classifier per
(feature kind, learning rate) pair, all trained together in one pass over the cached features with SGD
(momentum 0.9, no weight decay, cosine decay to 0, lr scaled by batch / 256); the pair with the best top-1 on a
validation split carved from train is the result.

Two departures, both for a fast probe on cached features: no augmentation (the centre crop's features are
computed once), and the features are standardised with the statistics of the training part, which is MAE's
BatchNorm without affine before the classifier (MAE Appendix A.2) for frozen features. Standardised features
train in far fewer steps, so DINOv2's learning-rate grid is extended upwards to 1.0."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import UserError
from ..data.sources import stratified_split
from .knn import accuracy

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,  # DINOv2's grid
                  0.2, 0.5, 1.0)
MOMENTUM = 0.9


def carve_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, validation): a stratified, seeded `fraction` of each class held out."""
    fit, val = stratified_split(labels.tolist(), fraction, seed)
    if not val or not fit:
        raise UserError(f"the train split ({len(labels)} images) is too small to hold out a validation split")
    return torch.tensor(fit), torch.tensor(val)


class LinearHeads:
    """L linear classifiers over one feature kind as one weight [D, L, C], so all heads are one matmul; each
    head has its own learning rate."""

    def __init__(self, dim: int, n_classes: int, lrs: torch.Tensor, gen: torch.Generator, device):
        self.lrs = lrs.to(device).view(-1, 1)
        self.weight = (torch.randn(dim, len(lrs), n_classes, generator=gen) * 0.01).to(device)  # DINOv2 init
        self.bias = torch.zeros(len(lrs), n_classes, device=device)
        self.params = [self.weight.requires_grad_(), self.bias.requires_grad_()]
        self.momentum = [torch.zeros_like(p) for p in self.params]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, C]."""
        return (x @ self.weight.flatten(1)).view(len(x), *self.bias.shape) + self.bias

    @torch.no_grad()
    def sgd_step(self, factor: float) -> None:
        """PyTorch SGD with momentum (buf = m buf + g; p -= lr buf), lr = factor x each head's own rate."""
        for p, buf in zip(self.params, self.momentum):
            buf.mul_(MOMENTUM).add_(p.grad)
            p.sub_(factor * self.lrs * buf)
            p.grad = None


def linear_probe(train: dict[str, torch.Tensor], train_labels: torch.Tensor, test: dict[str, torch.Tensor],
                 test_labels: torch.Tensor, n_classes: int, lrs=LEARNING_RATES, epochs: int = 30,
                 batch_size: int = 256, val_fraction: float = 0.1, seed: int = 0, device="cpu") -> dict:
    """Train every (kind, lr) head on train minus a validation split; report, per feature kind, the lr chosen
    on validation with its validation and test accuracy, and the best kind overall."""
    gen = torch.Generator().manual_seed(seed)
    fit, val = carve_validation(train_labels, val_fraction, seed)
    y_fit = train_labels[fit].to(device)
    scaled = torch.tensor(lrs, dtype=torch.float32) * batch_size / 256.0  # DINOv2 scale_lr
    stats = {kind: (x[fit].mean(0), x[fit].std(0) + 1e-6) for kind, x in train.items()}
    train = {kind: (x - stats[kind][0]) / stats[kind][1] for kind, x in train.items()}
    test = {kind: (x - stats[kind][0]) / stats[kind][1] for kind, x in test.items()}
    xs = {kind: x[fit].to(device) for kind, x in train.items()}
    heads = {kind: LinearHeads(x.shape[1], n_classes, scaled, gen, device) for kind, x in xs.items()}
    per_epoch = math.ceil(len(fit) / batch_size)
    total = epochs * per_epoch
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(fit), generator=gen).to(device)
        idx = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        factor = 0.5 * (1 + math.cos(math.pi * step / total))  # CosineAnnealingLR to 0, per iteration
        for kind, h in heads.items():
            logits = h(xs[kind][idx])
            loss = F.cross_entropy(logits.transpose(1, 2), y_fit[idx].unsqueeze(1).expand(-1, len(lrs)),
                                   reduction="sum") / len(idx)
            loss.backward()  # the sum over heads: each head gets its own mean cross-entropy gradient
            h.sgd_step(factor)
    return choose(heads, {k: x[val] for k, x in train.items()}, train_labels[val], test, test_labels, lrs, device)


@torch.no_grad()
def choose(heads: dict[str, LinearHeads], val: dict, val_labels: torch.Tensor, test: dict, test_labels: torch.Tensor,
           lrs, device) -> dict:
    kinds = {}
    for kind, h in heads.items():
        val_top1 = [accuracy(s, val_labels.to(device))["top1"] for s in h(val[kind].to(device)).unbind(1)]
        best = max(range(len(lrs)), key=lambda i: val_top1[i])
        test_acc = accuracy(h(test[kind].to(device))[:, best], test_labels.to(device))
        kinds[kind] = {"lr": lrs[best], "val_top1": val_top1[best], **test_acc}
    best_kind = max(kinds, key=lambda k: kinds[k]["val_top1"])
    return {"best": best_kind, **{k: v for k, v in kinds[best_kind].items() if k.startswith("top")}, "kinds": kinds}
