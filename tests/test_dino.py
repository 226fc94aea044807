"""DINO's loss, centre and teacher update against the paper's formulas written out by hand."""
import math

import torch

from selfsup.methods.base import ema_update
from selfsup.methods.dino import centred_sharpened, dino_loss, update_center
from selfsup.nn.heads import DINOHead


def reference_dino_loss(student, teacher, center, tau_s, tau_t):
    """DINO Eq. 3 / Algorithm 1, one sample and one pair at a time: -sum_k P_t[k] log P_s[k]."""
    n_global, n_crops, batch = len(teacher), len(student), teacher[0].shape[0]
    total, pairs = 0.0, 0
    for i in range(n_global):
        for v in range(n_crops):
            if v == i:
                continue
            for b in range(batch):
                t = [math.exp((teacher[i][b, k] - center[0, k]) / tau_t) for k in range(teacher[i].shape[1])]
                zt = sum(t)
                s = [math.exp(student[v][b, k] / tau_s) for k in range(student[v].shape[1])]
                zs = sum(s)
                total += -sum(tk / zt * math.log(sk / zs) for tk, sk in zip(t, s)) / batch
            pairs += 1
    return total / pairs


def test_dino_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    batch, k, n_global, n_local = 3, 7, 2, 3
    student = [torch.randn(batch, k, generator=g, dtype=torch.float64) for _ in range(n_global + n_local)]
    teacher = [torch.randn(batch, k, generator=g, dtype=torch.float64) for _ in range(n_global)]
    center = torch.randn(1, k, generator=g, dtype=torch.float64) * 0.1
    probs = [centred_sharpened(t, center, 0.04) for t in teacher]
    got = dino_loss(student, probs, 0.1).item()
    assert abs(got - reference_dino_loss(student, teacher, center, 0.1, 0.04)) < 1e-6


def test_dino_loss_is_zero_gradient_at_agreement_and_positive_otherwise():
    t = torch.tensor([[10.0, 0.0, 0.0]])
    p = [centred_sharpened(t, torch.zeros(1, 3), 1.0)] * 2
    same = dino_loss([t, t], p, 1.0)
    other = dino_loss([t.flip(1), t.flip(1)], p, 1.0)
    assert other > same > 0


def test_centre_is_an_ema_of_the_batch_mean():
    c = torch.tensor([[1.0, 2.0]])
    g = torch.tensor([[3.0, 0.0], [5.0, 4.0]])  # batch mean [4, 2]
    update_center(c, g, momentum=0.9)
    assert torch.allclose(c, torch.tensor([[0.9 * 1 + 0.1 * 4, 0.9 * 2 + 0.1 * 2]]))


def test_ema_update_moves_the_teacher_towards_the_student():
    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    t0 = teacher.weight.detach().clone()
    ema_update(teacher, student, momentum=0.75)
    assert torch.allclose(teacher.weight, 0.75 * t0 + 0.25 * student.weight)


def test_ema_update_skips_parameters_only_the_student_has():
    teacher = torch.nn.Sequential(torch.nn.Linear(2, 2))
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    ema_update(teacher, student, momentum=0.0)
    assert torch.equal(teacher[0].weight, student[0].weight)


def test_head_batchnorm_follows_each_hidden_linear_and_the_teacher_uses_batch_statistics():
    from selfsup.methods.dino import DINO
    from conftest import tiny_config

    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4, n_layers=3, use_bn=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    method = DINO(tiny_config(dino={"use_bn": True})).train()
    assert method.teacher["head"].training and not method.teacher["backbone"].training
    x = torch.randn(6, method.teacher["head"].mlp[0].in_features)
    bn = method.teacher["head"].mlp[1]
    before = bn.running_mean.clone()
    method.teacher["head"](x)
    assert not torch.equal(bn.running_mean, before)  # batch statistics: the running ones moved
    plain = DINO(tiny_config(dino={"use_bn": False})).train()
    assert not plain.teacher["head"].training  # without BN the teacher stays in eval mode
