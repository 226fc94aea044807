"""Multi-crop shapes, reproducibility and the photometric augmentations."""
import math

import numpy as np
import pytest
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


def torchvision_gaussian_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """torchvision's GaussianBlur(kernel_size, sigma) on a float image [1, C, H, W], restated
    (transforms/_functional_tensor.py gaussian_blur): taps at linspace(-(k-1)/2, (k-1)/2, k), exp(-x^2 / 2 sigma^2)
    normalised, the 2-D kernel their outer product, reflect padding of k // 2 on every side."""
    t = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, kernel, kernel)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, [kernel // 2] * 4, mode="reflect"), k2,
                                      groups=x.shape[1])


def blurred(img: torch.Tensor, sigmas: list[float], **photometric) -> torch.Tensor:
    params = torch.zeros(len(sigmas), N_PARAMS)
    params[:, Param.BLUR], params[:, Param.BLUR_SIGMA] = 1, torch.tensor(sigmas)
    c = CropsConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **photometric.pop("crops", {}))
    return Photometric(c, **photometric)(Crops(img, params))


def test_dinov2_blur_is_torchvision_gaussian_blur_kernel_9():
    from selfsup.methods import method_class

    assert {m: method_class(m).blur_kernel for m in ("simclr", "moco", "byol", "dino", "ibot", "dinov2", "distill")} \
        == {"simclr": 0, "moco": 0, "byol": 0, "dino": 0, "ibot": 0, "dinov2": 9, "distill": 9}
    img = torch.randint(0, 256, (4, 3, 24, 20), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    sigmas = [0.1, 0.7, 1.4, 2.0]
    want = torch.cat([torchvision_gaussian_blur(img[i : i + 1].float() / 255, 9, s) for i, s in enumerate(sigmas)])
    for got in (blurred(img, sigmas, method_kernel=9), blurred(img, sigmas, crops={"blur_kernel": 9}),
                blurred(img, sigmas, method_kernel=0, crops={"blur_kernel": 9})):  # the key beats the method's
        assert (got - want).abs().max() < 1e-6
    five = torch.cat([torchvision_gaussian_blur(img[i : i + 1].float() / 255, 5, s) for i, s in enumerate(sigmas)])
    assert (blurred(img, sigmas, crops={"blur_kernel": 5}) - five).abs().max() < 1e-6
    # 0 (DINO's PIL-like blur): each image to ceil(3 sigma), i.e. 13 taps at sigma 2 where kernel 9 cuts at 2 sigma
    own = blurred(img, sigmas, method_kernel=9, crops={"blur_kernel": 0})
    wide = torch.cat([torchvision_gaussian_blur(img[i : i + 1].float() / 255, 2 * math.ceil(3 * s) + 1, s)
                      for i, s in enumerate(sigmas)])
    assert (own - wide).abs().max() < 1e-6
    assert (own[3] - want[3]).abs().max() > 1e-3 and (own[0] - want[0]).abs().max() < 1e-6  # sigma 0.1: alike


def test_blur_kernel_must_be_auto_0_or_odd():
    from selfsup.config import Config, apply, validate
    from selfsup.core.errors import UserError

    for bad in (4, 1, -3, "nine"):
        cfg = Config()
        apply(cfg, {"crops": {"blur_kernel": bad}}, "test")
        with pytest.raises(UserError, match="auto, 0 or an odd kernel size >= 3"):
            validate(cfg)
    for good in ("auto", 0, 7):
        cfg = Config()
        apply(cfg, {"crops": {"blur_kernel": good}}, "test")
        validate(cfg)
        assert cfg.crops.blur_kernel == good
