"""Multi-crop shapes, reproducibility and the photometric augmentations."""
import numpy as np
import torch

from selfsup.config import CropsConfig
from selfsup.data.builtin import open_source
from selfsup.data.loader import MultiCropBatches
from selfsup.data.views import LUMA, N_PARAMS, Crops, MultiCrop, Param, Photometric, crop_box


def test_multicrop_shapes_are_crop_major():
    c = CropsConfig(global_size=28, local_size=12, n_local=5)
    src = open_source("mnist5k", "train")
    views = MultiCropBatches(src, MultiCrop(c, seed=0), global_batch=8)[0]
    assert views.global_crops.images.shape == (2 * 8, 3, 28, 28) and views.global_crops.images.dtype == torch.uint8
    assert views.local_crops.images.shape == (5 * 8, 3, 12, 12)
    x = Photometric(c)(views.global_crops)
    assert x.shape == (16, 3, 28, 28) and x.dtype == torch.float32
    assert views.labels.shape == (8,)


def test_crops_depend_only_on_seed_epoch_and_image():
    c = CropsConfig(global_size=16, local_size=8, n_local=2)
    src = open_source("digits", "train")
    full = MultiCropBatches(src, MultiCrop(c, seed=3), global_batch=8)
    half = MultiCropBatches(src, MultiCrop(c, seed=3), global_batch=8, rank=1, world=2)
    a, b = full[2], half[2]  # rank 1 of 2 holds the second half of the same global batch
    per_crop = lambda t: t.view(2, -1, *t.shape[1:])  # noqa: E731
    assert torch.equal(per_crop(a.global_crops.images)[:, 4:], per_crop(b.global_crops.images))
    other = MultiCropBatches(src, MultiCrop(c, seed=4), global_batch=8)[2]
    assert not torch.equal(other.global_crops.images, a.global_crops.images)


def test_crop_box_area_and_ratio_within_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        i, j, h, w = crop_box(rng, 100, 80, (0.2, 0.6), (3 / 4, 4 / 3))
        assert 0 <= i <= 100 - h and 0 <= j <= 80 - w
        assert 0.18 <= h * w / 8000 <= 0.62


def test_grayscale_uses_luma_weights_and_solarize_inverts_bright_pixels():
    c = CropsConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    img = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    params = torch.zeros(1, N_PARAMS)
    params[0, Param.GRAYSCALE] = 1  # grayscale only
    y = Photometric(c)(Crops(img, params))
    gray = sum(w * v for w, v in zip(LUMA, (200 / 255, 100 / 255, 50 / 255)))
    assert torch.allclose(y, torch.full_like(y, gray), atol=1e-6)
    # solarize only: 200 >= 128 is inverted, 100 and 50 are not
    params[0, Param.GRAYSCALE], params[0, Param.SOLARIZE] = 0, 1
    y = Photometric(c)(Crops(img, params))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([1 - 200 / 255, 100 / 255, 50 / 255]), atol=1e-6)
