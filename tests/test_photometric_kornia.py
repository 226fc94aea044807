"""The photometric augmentations of `Photometric` against kornia's functional operations (an independent
implementation). Every op runs through `Photometric.__call__` on uint8 crops, as in training, with the
normalisation turned off (mean 0, std 1), and is compared with kornia on the same images scaled to [0, 1].

selfsup follows torchvision's ColorJitter / Grayscale / GaussianBlur / RandomSolarize semantics (BYOL Table 6).
Where kornia's convention differs, the test says so in one line and restates it."""
import math

import numpy as np
import pytest
import torch

from selfsup.config import CropsConfig
from selfsup.data.views import JITTER_OPS, N_PARAMS, ORDERS, Crops, Param, Photometric, photometric_params

kornia = pytest.importorskip("kornia")
rgb_to_grayscale = kornia.color.rgb_to_grayscale
gaussian_blur2d = kornia.filters.gaussian_blur2d
adjust_brightness_accumulative = kornia.enhance.adjust_brightness_accumulative
adjust_contrast_with_mean_subtraction = kornia.enhance.adjust_contrast_with_mean_subtraction
adjust_saturation_with_gray_subtraction = kornia.enhance.adjust_saturation_with_gray_subtraction
adjust_hue = kornia.enhance.adjust_hue
solarize = kornia.enhance.solarize
normalize = kornia.enhance.normalize

B, S = 4, 32
# selfsup's grayscale weights (torchvision's, BYOL Table 6), restated rather than imported so that a change fails.
LUMA = torch.tensor([0.2989, 0.5870, 0.1140])
# kornia's default weights are (0.299, 0.587, 0.114): 1e-4 apart on red only, so a blend with the grayscale
# image or its mean by a factor f differs from kornia's by at most |1 - f| * 1e-4 (pixel values in [0, 1]).
LUMA_GAP = 1e-4
EPS = 1e-6  # float32 rounding of a few arithmetic ops on values in [0, 1]


def images(seed: int = 0, n: int = B) -> torch.Tensor:
    """uint8 [n, 3, S, S]: uniform noise, plus the cases the ops branch on: gray pixels (equal channels),
    two equal channels (hue ties), 0 and 255, and the solarize threshold 127 / 128."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, S, S), generator=g, dtype=torch.uint8)
    x[:, :, 0, :8] = x[:, :1, 0, :8]  # gray pixels
    x[:, 1, 1, :8] = x[:, 0, 1, :8]  # R == G
    x[:, 2, 2, :8] = x[:, 1, 2, :8]  # G == B
    x[:, 2, 3, :8] = x[:, 0, 3, :8]  # R == B
    x[:, :, 4, 0], x[:, :, 4, 1] = 0, 255
    x[:, :, 4, 2], x[:, :, 4, 3] = 127, 128
    x[-1] = x[-1] // 64 * 85  # 4 levels: many ties and saturated pixels
    return x


def photometric(img: torch.Tensor, **cols) -> torch.Tensor:
    """`Photometric` without normalisation, with parameter columns set per image (all ops off by default;
    jitter factors neutral). `cols` maps a `Param` name, lower case, to a scalar or a per-image sequence."""
    p = torch.zeros(len(img), N_PARAMS)
    p[:, [Param.BRIGHTNESS, Param.CONTRAST, Param.SATURATION]] = 1.0
    for k, v in cols.items():
        p[:, Param[k.upper()]] = torch.as_tensor(v, dtype=torch.float32)
    return Photometric(CropsConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))(Crops(img, p))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# One factor per image in each batch, so a factor applied to the wrong image also fails.
BRIGHTNESS = [0.6, 0.85, 1.2, 1.4]
CONTRAST = [0.6, 0.9, 1.15, 1.4]
SATURATION = [0.0, 0.8, 1.1, 1.2]
HUE = [-0.5, -0.1, 0.03, 0.25]  # a fraction of a turn
SIGMA = [0.1, 0.7, 1.3, 2.0]  # pixels


def jitter_diff(seed: int, op: str, factors: list[float], reference) -> float:
    """selfsup's jitter op `op` with one factor per image against kornia's `reference(x, factors)`."""
    img = images(seed)
    f = torch.tensor(factors)
    return max_diff(photometric(img, jitter=1, **{op: f}), reference(img.float() / 255, f))


def diff_brightness():
    # torchvision's brightness multiplies (blends with black): kornia's adjust_brightness adds, this one multiplies
    return jitter_diff(1, "brightness", BRIGHTNESS, adjust_brightness_accumulative)


def diff_contrast():
    # torchvision's contrast blends with the mean of the grayscale image; kornia's adjust_contrast only multiplies
    return jitter_diff(2, "contrast", CONTRAST, adjust_contrast_with_mean_subtraction)


def diff_saturation():
    # torchvision's saturation blends with the grayscale image; kornia's adjust_saturation scales HSV saturation
    return jitter_diff(3, "saturation", SATURATION, adjust_saturation_with_gray_subtraction)


def diff_hue():
    # torchvision's hue shift is a fraction of a turn, kornia's an angle in radians
    return jitter_diff(4, "hue", HUE, lambda x, f: adjust_hue(x, 2 * math.pi * f))


def diff_blur():
    img = images(5)
    x = img.float() / 255
    y = photometric(img, blur=1, blur_sigma=SIGMA)  # one batch, four sigmas: each image keeps its own kernel
    # selfsup cuts the kernel at radius ceil(3 sigma) (torchvision takes a fixed size); both pad by reflection
    ref = torch.cat([gaussian_blur2d(x[i : i + 1], 2 * math.ceil(3 * s) + 1, (s, s), border_type="reflect")
                     for i, s in enumerate(torch.tensor(SIGMA).tolist())])
    return max_diff(y, ref)


def diff_solarize():
    img = images(6)
    x = img.float() / 255
    # PIL / torchvision invert pixels at or above 128 (of 255); kornia inverts those at or above the threshold
    return max_diff(photometric(img, solarize=1), solarize(x, 128 / 255))


def diff_grayscale():
    img = images(7)
    x = img.float() / 255
    ref = rgb_to_grayscale(x, rgb_weights=LUMA).expand_as(x)  # torchvision's weights, 3 channels
    return max_diff(photometric(img, grayscale=1), ref)


def diff_grayscale_default_weights():
    img = images(7)
    x = img.float() / 255
    return max_diff(photometric(img, grayscale=1), rgb_to_grayscale(x).expand_as(x))


KORNIA_OPS = {  # name: (measure, kornia function, tolerance)
    "brightness": (diff_brightness, "adjust_brightness_accumulative", EPS),
    "contrast": (diff_contrast, "adjust_contrast_with_mean_subtraction",
                 max(abs(1 - f) for f in CONTRAST) * LUMA_GAP + EPS),
    "saturation": (diff_saturation, "adjust_saturation_with_gray_subtraction",
                   max(abs(1 - f) for f in SATURATION) * LUMA_GAP + EPS),
    "hue": (diff_hue, "adjust_hue (2 pi * shift)", 1e-5),
    "blur": (diff_blur, "gaussian_blur2d (k = 2 ceil(3 sigma) + 1, reflect)", EPS),
    "solarize": (diff_solarize, "solarize (threshold 128/255)", 0.0),
    "grayscale": (diff_grayscale, "rgb_to_grayscale (weights 0.2989, 0.587, 0.114)", EPS),
    "grayscale, kornia's weights": (diff_grayscale_default_weights, "rgb_to_grayscale (0.299, 0.587, 0.114)",
                                    LUMA_GAP + EPS),
}


@pytest.mark.parametrize("op", list(KORNIA_OPS))
def test_op_matches_kornia(op):
    measure, _, tol = KORNIA_OPS[op]
    d = measure()
    assert d <= tol, f"{op}: max |selfsup - kornia| = {d:.3g} > {tol:.3g}"


def test_wrong_factors_would_fail():
    """The comparisons are tight enough to see a slip in a factor's convention."""
    img = images(8)
    x = img.float() / 255
    f = torch.tensor(CONTRAST)
    y = photometric(img, jitter=1, contrast=f)
    assert max_diff(y, adjust_contrast_with_mean_subtraction(x, 1 / f)) > 1e-2
    assert max_diff(y, adjust_contrast_with_mean_subtraction(x, f.flip(0))) > 1e-2
    h = torch.tensor(HUE)
    assert max_diff(photometric(img, jitter=1, hue=h), adjust_hue(x, math.pi * h)) > 1e-2
    assert max_diff(photometric(img, solarize=1), solarize(x, 129 / 255)) > 0  # the 128 pixel is inverted
    s = torch.tensor(SIGMA)
    y = photometric(img, blur=1, blur_sigma=s)
    assert max_diff(y[2:3], gaussian_blur2d(x[2:3], 9, (1.1, 1.1))) > 1e-3


def test_jitter_in_every_order_and_the_whole_chain_match_kornia():
    """All four jitter ops in each of the 24 orders, then grayscale, blur, solarize and normalisation, with
    parameters drawn by `photometric_params` (every op switched on), against the same chain of kornia ops."""
    c = CropsConfig(color_jitter=1.0, grayscale=0.3)
    rng = np.random.default_rng(0)
    n = 24
    p = torch.from_numpy(np.stack([photometric_params(rng, c, 1.0, 1.0) for _ in range(n)]))
    p[:, Param.ORDER] = torch.arange(n)  # every order once
    img = images(9, n)
    y = Photometric(c)(Crops(img, p))
    mean, std = torch.tensor(c.mean), torch.tensor(c.std)
    for i in range(n):
        x = img[i : i + 1].float() / 255
        f = p[i : i + 1]
        for op in ORDERS[int(f[0, Param.ORDER])].tolist():
            col = JITTER_OPS[op]
            if col == Param.BRIGHTNESS:
                x = adjust_brightness_accumulative(x, f[:, col])
            elif col == Param.CONTRAST:
                x = adjust_contrast_with_mean_subtraction(x, f[:, col])
            elif col == Param.SATURATION:
                x = adjust_saturation_with_gray_subtraction(x, f[:, col])
            else:
                x = adjust_hue(x, 2 * math.pi * f[:, col]).clamp(0, 1)
        if f[0, Param.GRAYSCALE] > 0:
            x = rgb_to_grayscale(x, rgb_weights=LUMA).expand(1, 3, S, S)
        s = float(f[0, Param.BLUR_SIGMA])
        x = gaussian_blur2d(x, 2 * math.ceil(3 * s) + 1, (s, s)).clamp(0, 1)
        # a pixel within rounding of the threshold may be inverted on one side only: leave those out
        far = ((x - 128 / 255).abs() > 1e-3).expand(1, 3, S, S)
        ref = normalize(solarize(x, 128 / 255), mean, std)
        # contrast and saturation each differ by |1 - f| * 1e-4 (kornia's luma weights); the rest is rounding,
        # all scaled by 1 / std after normalisation
        fc, fs = float(f[0, Param.CONTRAST]), float(f[0, Param.SATURATION])
        tol = (abs(1 - fc) + abs(1 - fs)) * LUMA_GAP / min(c.std) + 1e-5
        assert max_diff(y[i : i + 1][far], ref[far]) <= tol, f"order {ORDERS[i].tolist()}"


if __name__ == "__main__":  # the table of max differences: python tests/test_photometric_kornia.py
    print(f"{'op':30s} {'kornia function':55s} {'max |diff|':>11s} {'tolerance':>10s}")
    for name, (measure, fn, tol) in KORNIA_OPS.items():
        print(f"{name:30s} {fn:55s} {measure():11.3g} {tol:10.3g}")
