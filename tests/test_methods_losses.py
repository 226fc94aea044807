"""The family's losses against the papers' formulas, written out by hand (loops over samples and pairs)."""
import math

import numpy as np
import pytest
import torch

from selfsup.config import Config, apply
from selfsup.errors import UserError
from selfsup.methods.byol import regression_loss
from selfsup.methods.contrastive import info_nce, info_nce_queue, nt_xent
from selfsup.methods.dinov2 import koleo_loss, sinkhorn_knopp
from selfsup.methods.ibot import masked_patch_loss
from selfsup.training.lars import LARS
from selfsup.training.optim import build_optimizer, set_schedule

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def test_nt_xent_matches_simclr_algorithm_1():
    n, tau = 4, 0.5
    z = rand(2 * n, 5)  # rows 0..n-1: view 1, rows n..2n-1: view 2
    s = [[cos(z[i], z[j]) for j in range(2 * n)] for i in range(2 * n)]  # the 2N x 2N similarity matrix

    def l(i, j):  # -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)
        return -math.log(math.exp(s[i][j] / tau) / sum(math.exp(s[i][k] / tau) for k in range(2 * n) if k != i))

    expected = sum(l(k, k + n) + l(k + n, k) for k in range(n)) / (2 * n)
    assert abs(nt_xent(z, tau).item() - expected) < 1e-9


def test_info_nce_in_batch_and_with_a_queue():
    n, tau = 3, 0.2
    q, k, queue = rand(n, 4), rand(n, 4), torch.nn.functional.normalize(rand(6, 4), dim=1)
    ctr = 0.0
    for i in range(n):  # MoCo v3 Alg. 1: CE(q k^T / tau, i) * 2 tau
        logits = [cos(q[i], k[j]) / tau for j in range(n)]
        ctr += -(logits[i] - math.log(sum(math.exp(x) for x in logits))) / n
    assert abs(info_nce(q, k, tau).item() - 2 * tau * ctr) < 1e-9
    moco = 0.0
    for i in range(n):  # MoCo Eq. 1: the positive key against the queue's K negatives
        pos = cos(q[i], k[i]) / tau
        neg = [cos(q[i], queue[j]) / tau for j in range(len(queue))]
        moco += -(pos - math.log(math.exp(pos) + sum(math.exp(x) for x in neg))) / n
    assert abs(info_nce_queue(q, k, queue, tau).item() - moco) < 1e-9


def test_byol_loss_is_two_minus_two_cosine():
    q, z = rand(5, 6), rand(5, 6)
    expected = sum(2 - 2 * cos(q[i], z[i]) for i in range(5)) / 5
    assert abs(regression_loss(q, z).item() - expected) < 1e-9
    assert regression_loss(q, 3 * q).abs().item() < 1e-9  # same direction, any scale: 0


def test_ibot_masked_cross_entropy_is_averaged_per_image_at_masked_patches():
    n_img, n_patch, k, tau = 3, 5, 4, 0.1
    masks = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    student, teacher = rand(n_img, n_patch, k), torch.softmax(rand(n_img, n_patch, k), -1)
    got = masked_patch_loss(student[masks], teacher[masks], masks, tau).item()
    expected = 0.0
    for b in range(n_img):
        terms = []
        for p in range(n_patch):
            if masks[b, p]:
                log_ps = torch.log_softmax(student[b, p] / tau, -1)
                terms.append(-sum(float(teacher[b, p, c] * log_ps[c]) for c in range(k)))
        expected += (sum(terms) / len(terms) if terms else 0.0) / n_img  # an unmasked image adds 0
    assert abs(got - expected) < 1e-9


def reference_sinkhorn(logits: np.ndarray, temp: float, iters: int) -> np.ndarray:
    q = np.exp(logits / temp).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(1, keepdims=True) * k  # each prototype's row sums to 1/K
        q /= q.sum(0, keepdims=True) * b  # each sample's column sums to 1/B
    return (q * b).T


def test_sinkhorn_knopp_row_and_column_sums():
    logits = rand(12, 5).float()
    out = sinkhorn_knopp(logits, 0.5, 3)
    assert np.allclose(out.numpy(), reference_sinkhorn(logits.double().numpy(), 0.5, 3), atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(12), atol=1e-5)  # every sample: a distribution
    many = sinkhorn_knopp(logits, 0.5, 200)
    assert torch.allclose(many.sum(0), torch.full((5,), 12 / 5), atol=1e-3)  # prototypes used equally: B / K
    assert torch.isfinite(sinkhorn_knopp(100 * logits, 0.01, 3)).all()  # exp(1e5) would overflow without the max


def test_koleo_is_minus_mean_log_nearest_neighbour_distance():
    x = rand(6, 3)
    u = x / x.norm(dim=1, keepdim=True)
    nn_dist = [min(float((u[i] - u[j]).norm()) for j in range(6) if j != i) for i in range(6)]
    expected = -sum(math.log(d) for d in nn_dist) / 6
    assert abs(koleo_loss(x).item() - expected) < 1e-6


def test_koleo_is_finite_for_one_sample_and_for_duplicates():
    one = rand(1, 4).float().requires_grad_()
    loss = koleo_loss(one)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()
    dup = torch.ones(4, 3).requires_grad_()
    loss = koleo_loss(dup)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dup.grad).all()


def test_lars_step_matches_the_formula():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "wd_mult": 1.0, "weight_decay": 0.1},
                {"params": [b], "wd_mult": 0.0, "weight_decay": 0.0}], lr=0.5, momentum=0.9, eta=0.001)
    w.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([2.0])
    opt.step()
    g = torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([3.0, 4.0])
    trust = 0.001 * 5.0 / float(g.norm())
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * g)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))  # excluded: plain SGD, no decay
    w.grad, b.grad = torch.zeros(2), torch.zeros(1)
    before = b.detach().clone()
    opt.step()  # the momentum carries on: v = 0.9 v
    assert torch.allclose(b.detach(), before - 0.9 * 0.5 * 2.0)


def test_sgd_is_momentum_sgd_with_the_scheduled_weight_decay_and_unknown_optimizers_fail():
    cfg = Config()
    apply(cfg, {"optim": {"optimizer": "sgd"}}, "test")
    lin = torch.nn.Linear(2, 1)
    opt = build_optimizer({"head": lin}, cfg, torch.device("cpu"))
    set_schedule(opt, lr=0.5, weight_decay=0.1)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad, lin.bias.grad = torch.ones(1, 2), torch.ones(1)
    opt.step()
    assert torch.allclose(lin.weight.detach(), w0 - 0.5 * (1 + 0.1 * w0))  # weights decay
    assert torch.allclose(lin.bias.detach(), b0 - 0.5)  # biases do not
    lin.weight.grad, lin.bias.grad = torch.zeros(1, 2), torch.zeros(1)
    b1 = lin.bias.detach().clone()
    opt.step()
    assert torch.allclose(lin.bias.detach(), b1 - 0.5 * 0.9)  # momentum 0.9
    apply(cfg, {"optim": {"decay_all": True}}, "test")  # MoCo v2: biases decay too
    assert [g["wd_mult"] for g in build_optimizer({"head": lin}, cfg, torch.device("cpu")).param_groups] == [1.0]
    apply(cfg, {"optim": {"optimizer": "adam"}}, "test")
    with pytest.raises(UserError, match="optim.optimizer='adam': expected one of adamw, lars, sgd"):
        build_optimizer({"head": lin}, cfg, torch.device("cpu"))
