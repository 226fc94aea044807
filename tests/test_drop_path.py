"""Efficient stochastic depth (DINOv2): the branch runs on a random subset of the samples, rescaled; equal in
expectation to plain drop path, the identity in eval mode."""
import math

import torch

from selfsup.nn.attention import Packing
from selfsup.nn.vit import Block, sample_subset, vit


def block(rate: float, efficient: bool) -> Block:
    torch.manual_seed(0)
    return Block(16, 2, 2.0, True, rate, None, "mlp", 1e-6, drop_path_efficient=efficient).train()


def branch(y: torch.Tensor, packing: Packing) -> torch.Tensor:
    return 2.0 * y + 1.0  # any function of each sample's own tokens


def test_dropped_samples_skip_the_branch_kept_ones_are_rescaled():
    b, n, rate = 10, 3, 0.4
    x = torch.randn(b * n, 4)
    calls = []

    def counted(y, p):
        calls.append(p.shapes)
        return branch(y, p)

    out = block(rate, True).residual(x, counted, Packing(((b, n),)))
    k = int(b * (1 - rate))  # 6 of 10 samples
    assert calls == [((k, n),)]  # the branch saw the kept samples only
    changed = (out != x).view(b, n, 4).any(-1).any(-1)
    assert int(changed.sum()) == k
    x3, out3 = x.view(b, n, 4), out.view(b, n, 4)
    torch.testing.assert_close(out3[changed], x3[changed] + branch(x3[changed], None) * b / k)
    assert torch.equal(out3[~changed], x3[~changed])


def test_subset_of_each_group_of_a_packing():
    torch.manual_seed(0)
    kept, scales = sample_subset(Packing(((10, 3), (5, 2))), 0.4, torch.device("cpu"))
    assert [len(k) for k in kept] == [6, 3] and scales == [10 / 6, 5 / 3]
    assert len(set(kept[0].tolist())) == 6 and max(kept[0]) < 10 and len(set(kept[1].tolist())) == 3 and max(kept[1]) < 5


def test_packed_efficient_drop_path_adds_the_branch_to_kept_samples_of_each_group():
    x, packing = Packing.pack([torch.randn(10, 3, 4), torch.randn(5, 2, 4)])
    out = block(0.4, True).residual(x, lambda y, p: torch.ones_like(y), packing)
    for delta, (b, n), k in zip(packing.unpack(out - x), packing.shapes, (6, 3)):
        kept = delta[:, 0, 0] > 0.5
        assert int(kept.sum()) == k
        torch.testing.assert_close(delta, kept.view(-1, 1, 1).float().expand_as(delta) * b / k)


def test_efficient_equals_plain_drop_path_in_expectation():
    """Mean over many draws of a real block's output. Per sample both keep each branch with probability 0.6
    and scale it by 1 / 0.6, so the means agree; the tolerance is 6 standard errors, and the test checks that an
    unscaled branch (a real bug) would be far outside it."""
    b, trials, rate = 10, 1500, 0.4
    efficient, plain = block(rate, True), block(rate, False)
    plain.load_state_dict(efficient.state_dict())
    x = torch.randn(b, 4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eff = torch.stack([efficient(x) for _ in range(trials)])
        pla = torch.stack([plain(x) for _ in range(trials)])
        full = efficient.eval()(x)
    se = torch.sqrt(eff.var(0) / trials + pla.var(0) / trials)
    assert ((eff.mean(0) - pla.mean(0)).abs() <= 6 * se + 1e-6).all()
    assert eff.var(0).mean() > 0.01 and pla.var(0).mean() > 0.01  # both do drop
    # a scaling bug (kept branches not divided by 0.6) moves the mean by ~0.4 x the branches' contribution:
    # the tolerance is less than half of that
    assert 0.4 * (full - x).abs().mean() > 2 * (6 * se).mean()


def test_subset_scale_is_unbiased():
    """The scale B / k times the inclusion frequency k / B is 1: estimated over draws within 6 standard errors;
    leaving the scale out (mean 0.6) lies ~25 standard errors away."""
    b, rate, trials = 10, 0.4, 2000
    total = torch.zeros(b)
    for _ in range(trials):
        (kept,), (scale,) = sample_subset(Packing(((b, 1),)), rate, torch.device("cpu"))
        total[kept] += scale
    mean = total / trials
    p = 0.6
    se = math.sqrt((1 / p) ** 2 * p * (1 - p) / trials)
    assert (mean - 1).abs().max() < 6 * se
    assert abs(p - 1) > 20 * se


def test_identity_in_eval_mode():
    torch.manual_seed(0)
    dropping = vit("vit_tiny", patch_size=8, depth=2, img_size=16, drop_path_rate=0.4, drop_path_uniform=True)
    clean = vit("vit_tiny", patch_size=8, depth=2, img_size=16, drop_path_rate=0.0)
    clean.load_state_dict(dropping.state_dict())
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(dropping.eval()(x), clean.eval()(x))
    assert not torch.equal(dropping.train()(x), clean.train()(x))


def test_plain_drop_path_below_rate_0_1_and_packed():
    """At rate <= 0.1 (DINOv2) or when switched off, the branch sees every sample; a packed drop path drops
    whole samples, all tokens of one sample alike."""
    for rate, efficient in ((0.1, True), (0.4, False)):
        seen = []
        x = torch.randn(10 * 3 + 4 * 2, 4)
        packing = Packing(((10, 3), (4, 2)))
        out = block(rate, efficient).residual(x, lambda y, p: seen.append(p) or torch.ones_like(y), packing)
        assert seen == [packing]
        delta = (out - x)[:30].view(10, 3, 4)
        kept = delta[:, 0, 0] > 0.5
        torch.testing.assert_close(delta, kept.view(-1, 1, 1).float().expand_as(delta) / (1 - rate))  # per sample
