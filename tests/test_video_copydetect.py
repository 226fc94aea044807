"""DAVIS label propagation and metrics, and Copydays-style copy detection, against plain restatements of the
references (dino eval_video_segmentation.py / eval_copy_detection.py, davis2017-evaluation metrics.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.errors import UserError
from selfsup.eval.copydetect import (_DISTORTIONS, Whitening, average_precision, copy_map, descriptor, distort,
                                     gem)
from selfsup.config import Config, apply
from selfsup.data.dense import VideoSequence, VideoSource
from selfsup.eval.cache import FeatureCache
from selfsup.eval.dense_features import video_features, video_grid
from selfsup.nn import backbone_from_config
from selfsup.eval.video import (boundary_f, j_and_f, labels_to_patches, neighbourhood_mask, propagate, region_j,
                                summarise, upsample_labels)


def square(size: int, top: int, left: int, side: int, value: int = 1) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.int64)
    m[top:top + side, left:left + side] = value
    return m


# ---------------------------------------------------------------- label propagation


def test_neighbourhood_mask_matches_the_reference_loops():
    for h, w, r in [(5, 7, 2), (4, 3, 0), (3, 3, 12)]:
        ref = torch.zeros(h, w, h, w)
        for i in range(h):
            for j in range(w):
                for p in range(2 * r + 1):
                    for q in range(2 * r + 1):
                        y, x = i - r + p, j - r + q
                        if 0 <= y < h and 0 <= x < w:
                            ref[i, j, y, x] = 1
        assert torch.equal(neighbourhood_mask(h, w, r), ref.reshape(h * w, h * w).bool())


def test_shifted_frame_gets_shifted_labels():
    g = torch.Generator().manual_seed(0)
    h, w = 6, 6
    f0 = torch.randn(h, w, 64, generator=g)
    f1 = torch.randn(h, w, 64, generator=g)
    f1[:, 1:] = f0[:, :-1]  # frame 1 is frame 0 moved one patch right; column 0 is new content
    labels = torch.randint(0, 3, (h, w), generator=g)
    onehot = F.one_hot(labels, 3).permute(2, 0, 1).float()
    exact = propagate([f0, f1], onehot, topk=1)
    assert len(exact) == 2 and torch.equal(exact[0], onehot)
    assert torch.allclose(exact[1][:, :, 1:], onehot[:, :, :-1])
    soft = propagate(torch.stack([f0, f1]), onehot)[1]  # defaults: top-5, exp(cos / 0.1)
    assert torch.equal(soft.argmax(0)[:, 1:], labels[:, :-1])
    assert torch.allclose(soft.sum(0), torch.ones(h, w))


def reference_propagation(feats, first_seg, n_last, topk, radius):
    """dino eval_video_segmentation.py, restated on CPU: affinity per target frame over the first frame and a
    queue of the n_last previous frames."""
    t, h, w, d = feats.shape
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            mask[i, j, max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1] = 1
    mask = mask.reshape(h * w, h * w)
    first_feat = feats[0].reshape(-1, d).T
    queue, out = [], []
    for cnt in range(1, t):
        used_feats = [first_feat] + [q[0] for q in queue]
        used_segs = [first_seg[None]] + [q[1] for q in queue]
        feat_tar = F.normalize(feats[cnt].reshape(-1, d), dim=1, p=2)
        sources = F.normalize(torch.stack(used_feats), dim=1, p=2)
        aff = torch.exp(torch.bmm(feat_tar[None].repeat(len(used_feats), 1, 1), sources) / 0.1)
        aff = aff * mask[None]
        aff = aff.transpose(2, 1).reshape(-1, h * w)
        tk_min = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values
        aff[aff < tk_min] = 0
        aff = aff / aff.sum(dim=0, keepdim=True)
        segs = torch.cat(used_segs)
        c = segs.shape[1]
        seg = (segs.reshape(len(used_segs), c, -1).transpose(2, 1).reshape(-1, c).T @ aff).reshape(1, c, h, w)
        if len(queue) == n_last:
            queue.pop(0)
        queue.append((feats[cnt].reshape(-1, d).T, seg))
        out.append(seg[0])
    return out


def test_propagate_matches_reference_restatement_with_queue_mask_and_chunks():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 5, 16, generator=g)
    feats = torch.stack([base + 0.5 * torch.randn(5, 5, 16, generator=g) for _ in range(5)])
    first = F.one_hot(torch.randint(0, 3, (5, 5), generator=g), 3).permute(2, 0, 1).float()
    ref = reference_propagation(feats, first, n_last=2, topk=4, radius=1)
    ours = propagate(feats, first, n_last=2, topk=4, radius=1, max_elements=60)  # several target chunks
    assert len(ours) == 5
    for a, b in zip(ours[1:], ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_labels_to_patches_and_upsample_labels():
    mask = torch.zeros(16, 24, dtype=torch.int64)
    mask[:, 8:16] = 1
    mask[:, 16:24] = 2
    patches = labels_to_patches(mask, 2, 8)
    assert patches.shape == (3, 2, 3)
    assert torch.equal(patches.argmax(0), torch.tensor([[0, 1, 2], [0, 1, 2]]))
    # one-hot stripes upsample back to the stripes (bilinear + per-channel min-max + argmax)
    assert torch.equal(upsample_labels(patches, (16, 24)), mask)
    assert torch.equal(upsample_labels(patches, (16, 24), patch=8), mask)
    assert upsample_labels(patches, (20, 30), patch=8).shape == (20, 30)
    # the per-channel min-max normalisation lets a weak but peaked channel win, as the reference's norm_mask
    soft = torch.zeros(2, 2, 2)
    soft[0] = 0.6
    soft[0, 0, 0] = 0.7
    soft[1] = 0.4
    soft[1, 1, 1] = 0.45
    assert upsample_labels(soft, (2, 2))[1, 1] == 1
    with pytest.raises(UserError):
        labels_to_patches(mask, 1, 8)
    # onto another grid: the original mask resized by nearest neighbour (the reference's read_seg)
    assert torch.equal(labels_to_patches(mask, 2, 8, grid=(1, 6)).argmax(0), torch.tensor([[0, 0, 1, 1, 2, 2]]))


def test_video_frames_keep_their_aspect_as_dino_reads_davis():
    # read_frame: the shorter side to 480, the longer floored to a multiple of 64; nothing cropped
    assert video_grid(480, 854, 480, 8) == (480, 832) and video_grid(854, 480, 480, 16) == (832, 480)
    assert video_grid(480, 854, 240, 8) == (240, 384)  # 427 -> 384
    assert video_grid(480, 854, 476, 14) == (476, 840)  # 64 is no multiple of 14: the patch's multiple, 846 -> 840
    assert video_grid(20, 24, 16, 16) == (16, 16)  # under 64 pixels: the patch's multiple


def test_video_features_are_the_forward_pass_without_autograd():
    class Frames(VideoSequence):
        name = "toy"

        def __len__(self) -> int:
            return 3

        def frame(self, t: int) -> torch.Tensor:
            return torch.full((3, 32, 48), 40 * t, dtype=torch.uint8)

        def mask(self, t: int) -> None:
            return None

    class Toy(VideoSource):
        name, files, sequences = "toy", None, [Frames()]

    cfg = Config()
    apply(cfg, {"backbone": {"arch": "vit_tiny", "patch_size": 16, "depth": 1, "img_size": 32}}, "test")
    torch.manual_seed(0)
    vit = backbone_from_config(cfg.backbone)
    (out,), size = video_features(vit, Toy(), "toy", None, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"),
                                  FeatureCache(None, "toy"))
    # a graph kept per batch held every batch's activations: 10 GB for 120 DAVIS-sized frames
    assert size == 32 and out.patch.shape == (3, 2, 3, 192) and not out.patch.requires_grad
    x = (torch.full((1, 3, 32, 48), 80 / 255) - 0.5) / 0.25  # frame 2, already on its 32 x 48 grid
    with torch.no_grad():
        want = vit.get_intermediate_layers(x, n=1, reshape=True)[0][0].permute(1, 2, 0)
    assert torch.allclose(out.patch[2].float(), want, atol=1e-2)


# ---------------------------------------------------------------- DAVIS metrics


def plain_bmap(seg: np.ndarray) -> np.ndarray:
    h, w = seg.shape
    b = np.zeros_like(seg)
    for y in range(h):
        for x in range(w):
            if y < h - 1 and x < w - 1:
                b[y, x] = seg[y, x] != seg[y, x + 1] or seg[y, x] != seg[y + 1, x] or seg[y, x] != seg[y + 1, x + 1]
            elif y == h - 1 and x < w - 1:
                b[y, x] = seg[y, x] != seg[y, x + 1]
            elif x == w - 1 and y < h - 1:
                b[y, x] = seg[y, x] != seg[y + 1, x]
    return b


def plain_f(pred: torch.Tensor, gt: torch.Tensor, radius: int) -> float:
    bp, bg = plain_bmap(pred.numpy() > 0), plain_bmap(gt.numpy() > 0)
    p_pts, g_pts = np.argwhere(bp), np.argwhere(bg)

    def matched(a, b):
        return sum(any((y - v) ** 2 + (x - u) ** 2 <= radius ** 2 for v, u in b) for y, x in a)

    precision, recall = matched(p_pts, g_pts) / len(p_pts), matched(g_pts, p_pts) / len(g_pts)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_region_j_on_hand_made_masks():
    a, b = square(10, 2, 2, 4), square(10, 2, 3, 4)  # 12 shared pixels, 20 in the union
    assert region_j(a, b) == pytest.approx(0.6)
    assert region_j(a, a) == 1.0
    empty = torch.zeros(10, 10)
    assert region_j(empty, empty) == 1.0 and region_j(a, empty) == 0.0


def test_boundary_f_against_plain_loops():
    a = square(20, 4, 4, 8)
    for shifted, bound_th in [(square(20, 4, 7, 8), 0.008), (square(20, 5, 7, 6), 2), (square(20, 9, 9, 9), 0.2)]:
        radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(20, 20))
        assert boundary_f(shifted, a, bound_th) == pytest.approx(plain_f(shifted, a, radius))
    assert 0 < boundary_f(square(20, 4, 7, 8), a) < 1
    assert boundary_f(a, a) == 1.0
    empty = torch.zeros(20, 20)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(a, empty) == 0.0 and boundary_f(empty, a) == 0.0


def test_j_and_f_skips_first_and_last_frames_and_summarise_averages_objects():
    gt = square(20, 2, 2, 6, 1) + square(20, 10, 10, 6, 2)
    moved = square(20, 2, 2, 6, 1) + square(20, 10, 12, 6, 2)  # object 2 moved two pixels right
    wrong = torch.zeros(20, 20, dtype=torch.int64)  # first and last frames: must not count
    seq = j_and_f([wrong, moved, gt, wrong], [gt, gt, gt, gt], n_objects=2)
    j2 = region_j(moved == 2, gt == 2)
    f2 = boundary_f(moved == 2, gt == 2)
    assert j2 == pytest.approx(24 / 48)
    assert seq["objects"] == 2
    assert seq["j"] == pytest.approx(100 * (1 + (j2 + 1) / 2) / 2)
    assert seq["f"] == pytest.approx(100 * (1 + (f2 + 1) / 2) / 2)
    assert seq["jf"] == pytest.approx((seq["j"] + seq["f"]) / 2)
    other = {"j": 40.0, "f": 60.0, "jf": 50.0, "objects": 1}
    total = summarise([seq, other])
    assert total["objects"] == 3 and total["sequences"] == 2
    assert total["j"] == pytest.approx((2 * seq["j"] + 40) / 3)
    assert total["jf"] == pytest.approx((total["j"] + total["f"]) / 2)
    with pytest.raises(UserError):
        j_and_f([gt, gt], [gt, gt], 1)


# ---------------------------------------------------------------- copy detection


def test_gem_and_descriptor():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 5, 4, generator=g) + 0.1
    assert torch.allclose(gem(x, p=1), x.mean(1))
    plain = torch.tensor([[(sum(float(x[n, l, d]) ** 4 for l in range(5)) / 5) ** 0.25 for d in range(4)]
                          for n in range(3)])
    assert torch.allclose(gem(x), plain, atol=1e-6)
    assert torch.allclose(gem(-x), torch.full((3, 4), 1e-6))  # negatives clamp to eps
    cls = torch.randn(3, 4, generator=g)
    d = descriptor(cls, x)
    assert d.shape == (3, 8) and torch.equal(d[:, :4], cls) and torch.allclose(d[:, 4:], gem(x))


def test_whitening_identity_covariance_and_numpy_restatement():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g) + 3.0
    test = torch.randn(20, 12, generator=g) @ torch.randn(12, 12, generator=g)
    white = Whitening().fit(train)
    z = white.project(train).double()
    assert torch.allclose(z.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.T @ z / len(z), torch.eye(12, dtype=torch.float64), atol=1e-4)
    out = white(test)
    assert torch.allclose(out.norm(dim=1), torch.ones(20))
    for dim in (None, 5):
        x = train.double().numpy()
        mean = x.mean(0)
        eigval, eigvec = np.linalg.eigh((x - mean).T @ (x - mean) / len(x))
        eigval = np.maximum(eigval, eigval.max() * 1e-5)
        idx = np.argsort(eigval)[::-1][:dim]
        ref = (test.double().numpy() - mean) @ eigvec[:, idx] / np.sqrt(eigval[idx])
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        ours = Whitening(dim).fit(train)(test).double().numpy()
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=1e-5)  # eigenvector signs are arbitrary


def holidays_ap(ranks, nres):
    """score_ap_from_ranks_1 of the Holidays package, as dino eval_copy_detection.py."""
    ap = 0.0
    for ntp, rank in enumerate(ranks):
        p0 = 1.0 if rank == 0 else ntp / float(rank)
        ap += (p0 + (ntp + 1) / float(rank + 1)) / nres / 2.0
    return ap


def test_average_precision_is_the_holidays_trapezoid():
    assert average_precision(torch.tensor([True, False, False])) == 1.0
    assert average_precision(torch.tensor([False, True, False])) == pytest.approx(0.25)
    for flags in ([True, False, True], [False, True, True, False, True], [False] * 4 + [True]):
        ranks = [i for i, f in enumerate(flags) if f]
        assert average_precision(torch.tensor(flags)) == pytest.approx(holidays_ap(ranks, len(ranks)))
    assert average_precision(torch.tensor([False, False]), n_relevant=1) == 0.0
    with pytest.raises(UserError):
        average_precision(torch.tensor([False, False]))


def test_copy_map_on_known_ranks():
    database = torch.eye(4)  # 4 originals or distractors
    queries = torch.tensor([[1.0, 0.1, 0.0, 0.0],  # nearest database[0]: its copy at rank 1
                            [0.0, 0.2, 1.0, 0.0],  # database[2] first, its original database[1] at rank 2
                            [0.0, 0.3, 0.2, 0.1]])  # its original database[3] at rank 3
    out = copy_map(queries, database, torch.tensor([0, 1, 3]))
    assert out["queries"] == 3 and out["database"] == 4
    assert out["map"] == pytest.approx(100 * (1 + 1 / 4 + 1 / 6) / 3)
    assert out["recall1"] == pytest.approx(100 / 3)
    top2 = copy_map(queries, database, torch.tensor([0, 1, 3]), top=2)  # rank 3 is cut off, as top-20 there
    assert top2["map"] == pytest.approx(100 * (1 + 1 / 4) / 3)
    with pytest.raises(UserError):
        copy_map(queries, database, torch.tensor([0, 1, 4]))


def test_distort_is_deterministic_same_shape_and_changes_the_image():
    g = torch.Generator().manual_seed(4)
    img = torch.randint(0, 256, (3, 48, 64), generator=g, dtype=torch.uint8)
    a = distort(img, np.random.default_rng(7))
    b = distort(img, np.random.default_rng(7))
    assert a.shape == img.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert (a.int() - img.int()).abs().float().mean() > 5
    assert not torch.equal(a, distort(img, np.random.default_rng(8)))
    from PIL import Image
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    rng = np.random.default_rng(0)
    for fn in _DISTORTIONS:
        out = fn(pil, rng)
        assert out.size == pil.size and out.mode == "RGB"
    with pytest.raises(UserError):
        distort(img.float(), np.random.default_rng(0))
