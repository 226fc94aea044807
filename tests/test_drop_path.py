"""Efficient stochastic depth (DINOv2): the branch runs on a random subset of the samples, rescaled; equal in
expectation to plain drop path, the identity in eval mode. In a training step (`sample_streams`) every sample
draws by its row in the global batch: W ranks holding B / W images each draw what one process with B does."""
import math

import pytest
import torch

from selfsup.nn.attention import Packing
from selfsup.nn.sample_rng import SampleStreams, sample_streams
from selfsup.nn.vit import Block, drop_path, sample_subset, vit


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


# ----- per-sample streams: any number of ranks draws what one process does -----

def share(x: torch.Tensor, crops: int, world: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s rows of a crop-major group (crop c of image i is row c * B + i): its B / world images of
    every crop, crop-major again."""
    return x.view(crops, world, -1, *x.shape[1:])[:, rank].flatten(0, 1)


GROUPS = ((2, 8, 3), (3, 8, 2))  # (crops, images in the global batch, tokens): global and local crops


def packed_groups(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c * b, n, 16, generator=g) for c, b, n in GROUPS]


def on_ranks(fn, xs: list[torch.Tensor], world: int, seed: int = 7) -> list[torch.Tensor]:
    """fn on each rank's share of the groups `xs` (packed), inside the step's streams; the outputs of every rank,
    put back in the global batch's order per group."""
    images = GROUPS[0][1]
    outs = []
    for r in range(world):
        local = [share(x, c, world, r) for x, (c, _, _) in zip(xs, GROUPS)]
        x, packing = Packing.pack(local)
        with sample_streams(seed, images // world, r, world):
            outs.append(packing.unpack(fn(x, packing)))
    return [torch.stack([o[i].view(c, images // world, *o[i].shape[1:]) for o in outs], 1).flatten(0, 2)
            for i, (c, _, _) in enumerate(GROUPS)]


def test_rows_of_a_rank_in_the_global_batch():
    s = SampleStreams(seed=0, batch=2, rank=1, world=2)
    rows, total = s.rows(6)  # 3 crops of this rank's 2 images, global batch of 4 images
    assert rows.tolist() == [2, 3, 6, 7, 10, 11] and total == 12
    assert SampleStreams(0, 4).rows(8)[0].tolist() == list(range(8))
    assert SampleStreams(0, 4, 1, 2).rows(3)[0].tolist() == [3, 4, 5]  # not crops of the images: a block per rank


@pytest.mark.parametrize("packed", [True, False])
def test_drop_path_masks_of_ranks_concatenate_to_those_of_one_process(packed):
    xs = [torch.ones(c * b, n, 4) for c, b, n in GROUPS]
    if packed:
        fn = lambda x, p: drop_path(x, 0.5, True, p)  # noqa: E731
    else:  # [B, N, C] without a packing, one group at a time
        fn = lambda x, p: torch.cat([drop_path(t, 0.5, True).flatten(0, 1) for t in p.unpack(x)])  # noqa: E731
    one = on_ranks(fn, xs, world=1)
    for world in (2, 4):
        for a, b in zip(on_ranks(fn, xs, world), one):
            assert torch.equal(a, b)
    kept = torch.cat([o[:, 0, 0] for o in one])
    assert set(kept.tolist()) == {0.0, 2.0} and 10 < int((kept > 0).sum()) < 30  # 40 samples, p 0.5
    assert not torch.equal(one[0][:8], one[0][8:])  # the crops of an image draw apart


def test_streams_differ_between_draws_and_steps_and_repeat_with_the_seed():
    x = torch.ones(64, 1)

    def masks(seed):
        with sample_streams(seed, 64):
            return drop_path(x, 0.5, True), drop_path(x, 0.5, True)

    a, b = masks(1)
    assert not torch.equal(a, b)  # a second block (or call) draws its own stream
    assert torch.equal(masks(1)[0], a) and not torch.equal(masks(2)[0], a)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    masks(1)
    assert torch.equal(torch.get_rng_state(), state)  # the torch RNG is left alone


@pytest.mark.parametrize("world", [2, 4])
def test_efficient_block_on_ranks_equals_one_process_per_sample(world):
    """A real block (attention and MLP, rate 0.4: the kept subset) on each rank's share gives every sample the
    output one process gives it; the subset is chosen over the global batch."""
    blk = block(0.4, True)
    xs = packed_groups()
    with torch.no_grad():
        one = on_ranks(blk, xs, world=1)
        many = on_ranks(blk, xs, world=world)
    for a, b, x in zip(many, one, xs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    changed = torch.cat([(o - x).abs().amax((1, 2)) > 0 for o, x in zip(one, xs)])
    assert 0 < int(changed.sum()) < len(changed)  # some samples skip both branches, some do not


def test_a_rank_with_no_kept_sample_runs_the_branch_on_one_scaled_by_zero():
    """Rate 0.9 over 2 crops of 8 images: k = 1 of 16 rows is kept, so 3 of 4 ranks keep none. They run the
    branch on one row, scaled by 0 (every rank runs the same modules), and their samples come out unchanged."""
    rate, seen, outs = 0.9, [], []
    x = torch.randn(16, 3, 4)
    for r in range(4):
        local, packing = Packing.pack([share(x, 2, 4, r)])
        with sample_streams(3, 2, r, 4):
            (kept,), (scale,) = sample_subset(packing, rate, torch.device("cpu"))
        with sample_streams(3, 2, r, 4):
            out = block(rate, True).residual(local, lambda y, p: seen.append(p.shapes) or torch.ones_like(y), packing)
        outs.append((len(kept), scale, out))
    assert sorted(k for k, _, _ in outs) == [1, 1, 1, 1] and sorted(s for _, s, _ in outs) == [0.0, 0.0, 0.0, 16.0]
    assert seen == [((1, 3),)] * 4
    for r, (_, scale, out) in enumerate(outs):
        delta = out - Packing.pack([share(x, 2, 4, r)])[0]
        assert int((delta.view(4, 3, 4).abs().amax((1, 2)) > 0).sum()) == (1 if scale else 0)


def test_subset_over_ranks_is_unbiased_and_keeps_k_of_the_global_batch():
    """Over 2 ranks, the kept samples of both make k = int(16 x 0.6) = 9 of the 16 global rows, and each row's
    scale times its inclusion frequency is 1 (6 standard errors over the draws)."""
    b, rate, trials = 8, 0.4, 1500
    total = torch.zeros(2 * b)
    for seed in range(trials):
        n_kept = 0
        for r in range(2):
            with sample_streams(seed, b, r, 2) as s:
                (kept,), (scale,) = sample_subset(Packing(((b, 1),)), rate, torch.device("cpu"))
                rows, _ = s.rows(b)
            total[rows[kept]] += scale
            n_kept += len(kept)
        assert n_kept == 9
    p = 9 / 16
    se = math.sqrt((1 / p) ** 2 * p * (1 - p) / trials)
    assert ((total / trials) - 1).abs().max() < 6 * se
