"""Dense evaluations on fixed tensors: attention masks and their Jaccard (DINO Fig. 4), linear segmentation and
linear depth (DINOv2), against plain formulas and hand-computed numbers, and on synthetic tasks with a known
answer."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.errors import UserError
from selfsup.eval.attention_masks import attention_jaccard, head_masks, jaccard
from selfsup.eval.depth import LinearDepth, depth_metrics, linear_depth, rmse
from selfsup.eval.segment import IGNORE, confusion, linear_segmentation, miou, segmentation_input


def test_head_masks_match_a_sort_and_cumsum_restatement():
    torch.manual_seed(0)
    attn = torch.rand(3, 4, 5, 6) ** 3
    ours = head_masks(attn, 0.6).numpy()
    for n in range(3):
        for h in range(4):
            a = attn[n, h].flatten().double().numpy()
            a = a / a.sum()
            want = np.zeros(a.size, dtype=bool)
            held = 0.0
            for i in np.argsort(-a):  # largest first, until 60 % of the mass is held
                if held >= 0.6:
                    break
                want[i] = True
                held += a[i]
            assert (ours[n, h].reshape(-1) == want).all()


def test_jaccard_on_hand_made_masks():
    pred = torch.tensor([[True, True], [False, False]])
    target = torch.tensor([[True, False], [True, False]])
    assert jaccard(pred, target).item() == pytest.approx(1 / 3)  # 1 shared pixel of 3
    valid = torch.tensor([[True, True], [False, True]])
    assert jaccard(pred, target, valid).item() == pytest.approx(1 / 2)  # the lone target pixel left out
    empty = torch.zeros(2, 2, dtype=torch.bool)
    both = jaccard(torch.stack([pred, empty]), torch.stack([target, empty]))
    assert both.tolist() == pytest.approx([1 / 3, 1.0])  # 0 / 0 counts as agreement


def test_attention_jaccard_one_head_on_the_object_one_on_the_background():
    fg_patches = torch.zeros(2, 4, 4, dtype=torch.bool)
    fg_patches[0, 1:3, 1:3] = True
    fg_patches[1, 0:2, 2:4] = True
    attn = torch.zeros(2, 2, 4, 4)
    for n in range(2):
        on = fg_patches[n]
        # head 0: 61 % on the 4 object patches, unevenly, so all 4 are needed to reach 60 %
        attn[n, 0][on] = torch.tensor([0.3, 0.2, 0.06, 0.05])
        attn[n, 0][~on] = 0.39 / 12
        # head 1: 96 % spread over the 12 background patches
        attn[n, 1][on] = 0.01
        attn[n, 1][~on] = 0.08
    foreground = fg_patches.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 8 x 8 pixels, patch 2
    valid = torch.ones_like(foreground)
    valid[:, 0, :] = False
    out = attention_jaccard(attn, foreground, valid)
    assert out["per_head"] == pytest.approx([100.0, 0.0])
    assert (out["best_head"], out["images"]) == (0, 2)
    assert out["jaccard_best"] == pytest.approx(100.0) and out["jaccard_mean"] == pytest.approx(50.0)


def test_confusion_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    conf = confusion(pred, target, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    out = miou(conf)
    # IoU: class 0 1/(2+2-1), class 1 2/(2+3-2), class 2 0/1, class 3 absent from both -> nan, left out
    assert out["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0]) and math.isnan(out["iou"][3])
    assert out["miou"] == pytest.approx(100 / 3)
    assert out["pixel_acc"] == pytest.approx(60.0)  # 3 of the 5 labelled pixels


def test_depth_metrics_by_hand_per_image_then_averaged():
    target = torch.tensor([[[1.0, 2.0, 4.0]], [[2.0, 0.0, 5.0]], [[0.0, 0.0, 0.0]]])
    pred = torch.tensor([[[1.0, 2.0, 2.0]], [[3.0, 7.0, 5.0]], [[1.0, 1.0, 1.0]]])
    valid = target > 0  # the third image has no valid pixel and is left out
    out = depth_metrics(pred, target, valid)
    # image 0: squared errors 0, 0, 4; image 1: 1, 0 (its middle pixel invalid)
    assert out["rmse"] == pytest.approx((math.sqrt(4 / 3) + math.sqrt(1 / 2)) / 2)
    assert out["abs_rel"] == pytest.approx(((2 / 4) / 3 + (1 / 2) / 2) / 2)
    assert out["delta1"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # ratios 1, 1, 2 and 1.5, 1
    assert rmse(pred, target, valid) == pytest.approx(out["rmse"])


def test_segmentation_input_concatenates_each_layer_with_its_cls():
    torch.manual_seed(0)
    patch, cls = torch.randn(2, 4, 3, 5, 6), torch.randn(2, 4, 3)
    x = segmentation_input(patch, cls)
    assert x.shape == (2, 4 * 2 * 3, 5, 6)
    for layer in range(4):
        assert torch.equal(x[:, 6 * layer: 6 * layer + 3], patch[:, layer])
        cls_part = x[:, 6 * layer + 3: 6 * layer + 6]
        assert torch.equal(cls_part, cls[:, layer, :, None, None].expand(-1, -1, 5, 6))  # constant over space
    assert segmentation_input(patch[:, -1:], cls[:, -1:]).shape == (2, 6, 5, 6)  # 'lin.': the last layer only


def halves(n: int, informative: bool, seed: int):
    """Features [n, 8, 4, 4] and labels [n, 16, 16] (patch 4): each image split at a random column of its
    patch grid into class 1 (left) and class 0; channel 0 is +-1 by class, or noise when not informative."""
    g = torch.Generator().manual_seed(seed)
    cut = torch.randint(1, 4, (n, 1, 1), generator=g)
    grid = (torch.arange(4).view(1, 1, 4) < cut).expand(n, 4, 4).long()
    x = torch.randn(n, 8, 4, 4, generator=g)
    if informative:
        x[:, 0] = (2.0 * grid - 1) + 0.1 * x[:, 0]
    return x, grid.repeat_interleave(4, 1).repeat_interleave(4, 2)


def test_linear_segmentation_learns_a_linear_rule_and_not_noise():
    xtr, ytr = halves(256, True, seed=1)
    ytr[:, :2] = IGNORE  # ignored rows must not matter
    xte, yte = halves(32, True, seed=2)
    out = linear_segmentation(xtr.half(), ytr, xte, yte, n_classes=2)
    assert out["miou"] > 90 and out["pred"].shape == (32, 16, 16) and out["pred"].dtype == torch.int64
    again = linear_segmentation(xtr.half(), ytr, xte, yte, n_classes=2)
    assert torch.equal(out["pred"], again["pred"])  # deterministic given the seed
    ntr, ytr = halves(256, False, seed=3)
    nte, yte = halves(32, False, seed=4)
    assert linear_segmentation(ntr, ytr, nte, yte, n_classes=2)["miou"] < 60  # chance is ~33 to 50


def test_linear_depth_head_is_the_reference_computation():
    """DINOv2's order: features upsampled x4 (bilinear), 1x1 conv, ReLU + 0.1 normalised, bins averaged, then
    resized to the label size; ours upsamples the logits instead, which must give the same depth."""
    torch.manual_seed(0)
    head = LinearDepth(6, 0.5, 8.0)
    feats = torch.randn(2, 6, 3, 5)
    up = F.interpolate(feats, size=(12, 20), mode="bilinear", align_corners=False)
    share = torch.relu(head.conv(up)) + 0.1
    share = share / share.sum(1, keepdim=True)
    depth = torch.einsum("bkhw,k->bhw", share, torch.linspace(0.5, 8.0, 256))
    want = F.interpolate(depth[:, None], size=(17, 23), mode="bilinear", align_corners=False)[:, 0]
    got = head(feats, (17, 23))
    assert torch.allclose(got, want, atol=1e-5)
    assert got.min() >= 0.5 and got.max() <= 8.0  # a convex combination of the bins


def test_linear_depth_beats_the_mean_when_depth_is_linear_in_a_feature():
    g = torch.Generator().manual_seed(0)

    def task(n: int):
        x = torch.randn(n, 6, 4, 4, generator=g)
        u = torch.rand(n, 4, 4, generator=g) * 2 - 1
        x[:, 0] = u
        # the patch depths 2 + 1.5 u, spread bilinearly over 16 x 16 pixels as the head upsamples
        depth = F.interpolate((2.0 + 1.5 * u)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        depth[:, 0, :4] = 0.0  # invalid pixels
        return x, depth

    (xtr, dtr), (xte, dte) = task(96), task(32)
    out = linear_depth(xtr, dtr, xte, dte, min_depth=0.1, max_depth=4.0, epochs=30, batch_size=8)
    assert out["pred"].shape == (32, 16, 16)
    assert out["rmse"] < 0.4 * out["mean_baseline"], out
    assert out["delta1"] > 0.9


@pytest.mark.parametrize("call", [
    lambda: head_masks(-torch.rand(1, 2, 3, 3)),
    lambda: jaccard(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)),
    lambda: attention_jaccard(torch.rand(1, 2, 3, 3), torch.ones(1, 8, 8, dtype=torch.bool), None),
    lambda: segmentation_input(torch.rand(2, 1, 3, 4, 4), torch.rand(2, 1, 5)),
    lambda: confusion(torch.tensor([0, 3]), torch.tensor([0, 1]), 3),
    lambda: linear_segmentation(torch.rand(4, 2, 2, 2), torch.zeros(3, 4, 4, dtype=torch.long),
                                torch.rand(2, 2, 2, 2), torch.zeros(2, 4, 4, dtype=torch.long), 2),
    lambda: linear_depth(torch.rand(2, 2, 2, 2), torch.ones(2, 4, 4), torch.rand(2, 2, 2, 2), torch.ones(2, 4, 4),
                         min_depth=5.0, max_depth=1.0),
])
def test_bad_arguments_raise_user_error(call):
    with pytest.raises(UserError):
        call()


def test_object_mass_is_the_attention_share_on_object_pixels():
    from selfsup.eval.attention_masks import object_mass

    attn = torch.zeros(1, 2, 2, 2)
    attn[0, 0, 0, 0] = 1.0  # head 0: all on the top-left patch
    attn[0, 1] = 0.25  # head 1: uniform
    fg = torch.zeros(1, 4, 4, dtype=torch.bool)
    fg[0, :2, :2] = True  # the object is the top-left patch
    fg[0, 2, 2] = True  # and one pixel of the bottom-right patch (a quarter of it)
    got = object_mass(attn, fg)
    assert got.tolist() == pytest.approx([100.0, 100 * (1 + 0.25) / 4])  # uniform attention: the area, 5/16
