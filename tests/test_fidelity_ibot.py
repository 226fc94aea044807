"""iBOT and DINOv2, each against its own reference: block masking (bytedance/ibot loader.py; dinov2/data/collate.py
and masking.py), the frozen last layer (dino utils.cancel_gradients_last_layer; dinov2 train.py's last-layer lr
schedule) and the patch centre (ibot main_ibot.py iBOTLoss.update_center; dinov2 loss/ibot_patch_loss.py as
train/ssl_meta_arch.py calls it). Each test holds selfsup to a plain restatement of the reference's rule."""
import math

import numpy as np
import pytest
import torch

from selfsup.data.masking import BlockMasking, DINOv2Masking
from selfsup.methods import build_method
from selfsup.methods.base import Batch
from selfsup.training.schedules import Schedules
from selfsup.training.trainer import Trainer
from tiny import tiny_config

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
HEADS = {"head_n_prototypes": 128, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


# ----- restatements of the references' masking, drawing from one numpy Generator where they call `random` -----
def py_uniform(rng, a, b):
    return a + (b - a) * rng.random()  # random.uniform(a, b), also for a > b


def reference_blocks(rng, H, W, target, smallest, largest, log):
    """BEiT's loop as both references write it: blocks while under the target, 10 tries each, stop when stuck.
    `log` gets (area drawn, patches left, patches added) per block kept."""
    mask = np.zeros((H, W), dtype=bool)
    done = 0
    while done < target:
        left = min(target - done, largest)
        gained = 0
        for _ in range(10):
            area = py_uniform(rng, smallest, left)
            ratio = math.exp(py_uniform(rng, *LOG_ASPECT))
            bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if bh >= H or bw >= W:
                continue
            y, x = int(rng.integers(0, H - bh + 1)), int(rng.integers(0, W - bw + 1))
            fresh = bh * bw - int(mask[y : y + bh, x : x + bw].sum())
            if 0 < fresh <= left:
                for i in range(y, y + bh):
                    for j in range(x, x + bw):
                        mask[i, j] = True
                gained = fresh
                log.append((area, left, fresh))
                break
        if gained == 0:
            break
        done += gained
    return mask


def ibot_reference(rng, H, W, n_crops, p, ratio, log):
    """loader.py ImageFolderMask.__getitem__ (pred_shape 'block') with --pred_ratio 0 0.3 --pred_ratio_var 0 0.2
    read as: each crop masked with probability p, ratio ~ U(0.1, 0.5), target ratio * H * W unrounded,
    smallest block (min(H, W) // 3) ** 2, no largest but what is left. Returns (masks, targets)."""
    masks, targets = [], []
    for _ in range(n_crops):
        r = py_uniform(rng, *ratio) if rng.random() < p else 0.0
        targets.append(r * H * W)
        masks.append(reference_blocks(rng, H, W, r * H * W, (min(H, W) // 3) ** 2, math.inf, log))
    return np.stack(masks), np.array(targets)


def dinov2_reference(rng, H, W, n_crops, p, ratio, log):
    """collate.py collate_data_and_cast + masking.py MaskingGenerator (min_num_patches 4, max_num_patches
    0.5 * N): int(n * p) crops masked, the i-th with int(N * U(probs[i], probs[i+1])) patches, probs =
    linspace(lo, hi, n_masked + 1), the rest with 0; then shuffled. Returns (masks, targets) in the final order."""
    N = H * W
    n_masked = int(n_crops * p)
    probs = np.linspace(ratio[0], ratio[1], n_masked + 1)
    masks, targets = [], []
    for i in range(n_crops):
        t = int(N * py_uniform(rng, probs[i], probs[i + 1])) if i < n_masked else 0
        targets.append(t)
        masks.append(reference_blocks(rng, H, W, t, 4, 0.5 * N, log))
    order = rng.permutation(n_crops)  # random.shuffle
    return np.stack(masks)[order], np.array(targets)[order]


@pytest.mark.parametrize("grid", [(14, 14), (4, 4)])
def test_ibot_masks_follow_ibot_loader(grid):
    H, W = grid
    ours = BlockMasking(grid, n_crops=2, probability=0.5, ratio=(0.1, 0.5))
    masked = []
    for seed in range(300):
        log = []
        ref, targets = ibot_reference(np.random.default_rng(seed), H, W, 2, 0.5, (0.1, 0.5), log)
        got = ours(np.random.default_rng(seed)).numpy()
        assert np.array_equal(got, ref)
        counts = got.reshape(2, -1).sum(1)
        assert np.all(counts <= targets)  # never above r * N
        smallest = (min(H, W) // 3) ** 2
        assert all(min(smallest, left) <= area <= max(smallest, left) for area, left, _ in log)
        masked += list(targets > 0)
    assert 0.4 < np.mean(masked) < 0.6  # each crop on its own, with probability 0.5 (not exactly half)


@pytest.mark.parametrize("grid,n_images,p", [((16, 16), 32, 0.5), ((16, 16), 5, 0.5), ((4, 4), 16, 0.5),
                                             ((14, 14), 8, 1.0)])
def test_dinov2_masks_follow_dinov2_collate(grid, n_images, p):
    H, W = grid
    N, n = H * W, 2 * n_images
    ours = DINOv2Masking(grid, n_crops=2, probability=p, ratio=(0.1, 0.5))
    n_masked = int(n * p)
    probs = np.linspace(0.1, 0.5, n_masked + 1)
    for seed in range(40):
        log = []
        ref, targets = dinov2_reference(np.random.default_rng(seed), H, W, n, p, (0.1, 0.5), log)
        got = ours.batch(np.random.default_rng(seed), n_images).numpy()
        assert np.array_equal(got, ref)
        assert (targets > 0).sum() == n_masked  # exactly int(n * p) of the batch's global crops
        ratios = np.sort(targets[targets > 0]) / N  # one in each linspace bin (floored to whole patches)
        assert np.all(ratios > probs[:-1] - 1 / N) and np.all(ratios <= probs[1:])
        counts = got.reshape(n, -1).sum(1)
        assert np.all(counts <= targets)
        if N >= 196:  # a masked crop is never left empty on a real grid
            assert np.array_equal(counts > 0, targets > 0)
        # every block drawn with an area of at least 4 patches (or what is left, if less), at most N / 2
        assert all(min(4, left) <= area <= max(4, left) and left <= N / 2 for area, left, _ in log)


def test_dinov2_rule_on_one_image_masks_exactly_one_of_its_two_crops():
    gen = DINOv2Masking((16, 16), n_crops=2)
    for seed in range(50):
        counts = gen(np.random.default_rng(seed)).numpy().reshape(2, -1).sum(1)
        assert (counts > 0).sum() == 1 and 25 <= counts.max() <= 128


def test_each_method_masks_by_its_own_reference_unless_told():
    ibot = build_method(tiny_config("ibot", ibot=HEADS)).masking()
    assert isinstance(ibot, BlockMasking) and ibot.min_block == (4 // 3) ** 2
    dinov2 = build_method(tiny_config("dinov2", ibot={**HEADS, "separate_head": True})).masking()
    assert isinstance(dinov2, DINOv2Masking) and dinov2.min_block == 4 and dinov2.max_block == 8
    swapped = build_method(tiny_config("ibot", ibot={**HEADS, "masking": "dinov2"})).masking()
    assert isinstance(swapped, DINOv2Masking)


# ----- the frozen last layer -----
@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_frozen_last_layer_dino_drops_the_gradient_dinov2_sets_lr_zero(tmp_path, method):
    extra = {"ibot": {**HEADS, "separate_head": True}} if method == "dinov2" else {}
    cfg = tiny_config(method, optim={"steps": 2, "freeze_last_layer_epochs": 100.0, "schedule_epochs": None}, **extra)
    t = Trainer(cfg, tmp_path / "run")
    last = [p for p in t.method.last_layer_params() if p.requires_grad]
    before = [p.detach().clone() for p in last]
    other = t.method.student["head"].mlp[0].weight
    other0 = other.detach().clone()
    t.fit()
    assert t.step == 2 and not torch.equal(other, other0)  # the rest trained
    for p, p0 in zip(last, before):
        assert torch.equal(p, p0)  # no update in the frozen steps, either way
        state = t.optimizer.state.get(p, {})
        if method == "dino":  # utils.cancel_gradients_last_layer: no gradient, so no Adam state at all
            assert "exp_avg" not in state
        else:  # train.py: lr 0, the gradient kept: the moments accumulate
            assert state["exp_avg"].abs().sum() > 0 and state["exp_avg_sq"].abs().sum() > 0



@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_frozen_last_layer_trains_after_the_freeze(tmp_path, method):
    """Frozen for the first of 3 steps (epochs of 1 step), then trained. DINO's Adam counts only the 2 unfrozen
    steps (no gradient while frozen: its moments start after the freeze); DINOv2's counts all 3 (lr 0, the
    gradient kept), so the moments it accumulated while frozen shape its first real update."""
    extra = {"ibot": {**HEADS, "separate_head": True}} if method == "dinov2" else {}
    cfg = tiny_config(method, optim={"steps": 3, "epoch_length": 1, "freeze_last_layer_epochs": 1.0,
                                     "schedule_epochs": None}, **extra)
    t = Trainer(cfg, tmp_path / "run")
    last = [p for p in t.method.last_layer_params() if p.requires_grad]
    before = [p.detach().clone() for p in last]
    seen = []  # the weights after each step (the trial steps before the run's first restore what they change)
    after_step = t.method.after_step

    def record(progress):
        after_step(progress)
        seen.append([p.detach().clone() for p in last])

    t.method.after_step = record
    t.fit()
    assert t.step == 3
    seen = [before] + seen[-3:]
    for k, p in enumerate(last):
        assert torch.equal(seen[1][k], seen[0][k])  # step 1 frozen: unchanged
        assert not torch.equal(seen[2][k], seen[1][k]) and not torch.equal(seen[3][k], seen[2][k])  # then trains
        assert int(t.optimizer.state[p]["step"]) == (2 if method == "dino" else 3)

# ----- the patch centre -----
def one_batch(cfg, method, B=4):
    g = torch.randn(2 * B, 3, 16, 16)
    local = torch.randn(2 * B, 3, 8, 8)
    rng = np.random.default_rng(0)
    masking = method.masking()
    if hasattr(masking, "batch"):
        masks = masking.batch(rng, B)
    else:
        masks = torch.stack([masking(rng) for _ in range(B)], 1).flatten(0, 1)  # crop-major, as MultiCrop
    assert 0 < masks.sum() < masks.numel()  # some masked, some not: the two rules differ
    return Batch(g, local, masks, torch.zeros(B), 2, 2), Schedules.build(cfg, method.schedules(), 10, 10).progress(0)


def test_ibot_patch_centre_is_the_mean_over_all_teacher_patch_tokens():
    torch.manual_seed(0)
    cfg = tiny_config("ibot", ibot={**HEADS, "mask_sample_probability": 1.0})
    m = build_method(cfg)
    batch, progress = one_batch(cfg, m)
    c0 = torch.randn_like(m.center_patch)
    m.center_patch.copy_(c0)
    m(batch, progress)
    with torch.no_grad():  # main_ibot.py iBOTLoss.update_center: teacher_patch [n, N, K], every patch
        tokens = m.teacher["backbone"].forward_features(batch.global_crops)["x_norm_patchtokens"]
        teacher_patch = m.teacher["head"](tokens)
        batch_center = teacher_patch.mean(1).sum(0, keepdim=True) / len(teacher_patch)
        expected = c0 * 0.9 + batch_center * 0.1
    assert torch.allclose(m.center_patch, expected, atol=1e-6, rtol=0)


def test_dinov2_patch_centre_is_the_mean_over_the_masked_teacher_patch_tokens():
    torch.manual_seed(0)
    cfg = tiny_config("dinov2", ibot={**HEADS, "separate_head": True}, dinov2={"centering": "centering"})
    m = build_method(cfg)
    batch, progress = one_batch(cfg, m)
    c0 = torch.randn_like(m.center_patch)
    m.center_patch.copy_(c0)
    m(batch, progress)
    with torch.no_grad():  # ssl_meta_arch.py: the masked rows as [1, M, K]; ibot_patch_loss.py reduce_center_update
        tokens = m.teacher["backbone"].forward_features(batch.global_crops)["x_norm_patchtokens"]
        masked = m.teacher["ibot_head"](tokens[batch.masks.flatten(1)]).unsqueeze(0)
        batch_center = masked.mean(1).sum(0, keepdim=True) / len(masked)
        expected = c0 * 0.9 + batch_center * 0.1
    assert torch.allclose(m.center_patch, expected, atol=1e-6, rtol=0)


def test_dinov2_patch_centre_over_ranks_is_the_mean_of_each_ranks_mean(monkeypatch):
    """ibot_patch_loss.py apply_center_update: sum over ranks of each rank's mean, divided by the world size
    (not the mean over all rows: ranks with more masked patches do not weigh more)."""
    from selfsup.methods import dinov2
    from selfsup.core import distributed

    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(5, 8) + 2.0
    other = torch.cat([b.mean(0, keepdim=True), torch.ones(1, 1)], dim=1)  # what rank b contributes
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda x: x + other)
    center = torch.zeros(1, 8)
    dinov2.update_patch_center(center, a, 0.9)
    expected = 0.1 * (a.mean(0) + b.mean(0)) / 2
    assert torch.allclose(center, expected.unsqueeze(0), atol=1e-6, rtol=0)


def test_dinov2_multicrop_masks_half_of_the_batch_with_spread_ratios():
    """The batch rule is the one training uses: MultiCrop asks DINOv2's masking for the whole batch."""
    import numpy as np
    import torch

    from selfsup.config import CropsConfig
    from selfsup.data.masking import DINOv2Masking
    from selfsup.data.views import MultiCrop

    crops = CropsConfig(global_size=32, local_size=16, n_local=0)
    masking = DINOv2Masking((8, 8), 2)
    views = MultiCrop(crops, seed=0, masking=masking)
    samples = [(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8), 0, i) for i in range(8)]
    m = views(samples, epoch=0).masks
    assert m.shape == (16, 8, 8) and int((m.flatten(1).sum(1) > 0).sum()) <= 8  # int(16 * 0.5) crops masked
    again = views(samples, epoch=0).masks
    assert torch.equal(m, again)  # seeded by the batch's images: a resumed run masks alike
    edges = np.linspace(0.1, 0.5, 9)
    assert m.flatten(1).float().mean(1).max() <= edges[-1] + 1e-6
