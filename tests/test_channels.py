"""Any number of input channels (issue 16 item 7): multi-channel TIFF, 16-bit PNG and .npy sources keep their channels
and range, the backbones take backbone.in_chans, a 3-channel checkpoint is adapted, per-channel statistics are given or
computed, and 3-channel RGB is bit-identical to what it was."""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file

from selfsup.cli import main
from selfsup.config import CropsConfig
from selfsup.core.errors import UserError
from selfsup.data import sources
from selfsup.data.builtin import open_source
from selfsup.data.channels import channel_stats, fit_to_source
from selfsup.data.loader import epoch_loader, make_batches
from selfsup.data.sources import decode
from selfsup.data.views import N_PARAMS, Crops, MultiCrop, Param, Photometric, eval_transform
from selfsup.methods import build_method
from selfsup.nn import backbone_from_config
from selfsup.nn.adapt import adapt_input_channels, adapt_input_conv
from selfsup.weights import Loaded, resolve_init, save_backbone
from tiny import ARGS, tiny_config

tifffile = pytest.importorskip("tifffile")


@pytest.fixture(autouse=True)
def fresh_folders(monkeypatch):
    monkeypatch.setattr(sources, "_checked", {})


def tiff_folder(root, n: int = 10, size: int = 20):
    """Two classes of 16-bit 4-channel TIFFs: half as 4 pages, half as 4 samples per pixel."""
    rng = np.random.default_rng(0)
    arrays = {}
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 65536, (4, size, size), dtype=np.uint16)
            if i % 2:
                tifffile.imwrite(root / c / f"{i}.tif", a.transpose(1, 2, 0), photometric="minisblack",
                                 planarconfig="contig")
            else:
                tifffile.imwrite(root / c / f"{i}.tif", a, photometric="minisblack")
            arrays[root / c / f"{i}.tif"] = a
    return arrays


# ----- backbones and the adapted first convolution -----

@pytest.mark.parametrize("in_chans", [1, 4])
def test_vit_and_resnet_take_in_chans(in_chans):
    cfg = tiny_config(backbone={"in_chans": in_chans}).backbone
    vit = backbone_from_config(cfg).eval()
    assert vit.patch_embed.proj.weight.shape[1] == in_chans
    assert vit(torch.rand(2, in_chans, 16, 16)).shape == (2, 192)
    cfg.arch, cfg.cifar_stem = "resnet18", True
    resnet = backbone_from_config(cfg).eval()
    assert resnet.conv1.weight.shape[1] == in_chans
    assert resnet(torch.rand(2, in_chans, 16, 16)).shape == (2, 512)


def test_adapt_input_conv_against_a_restatement():
    w = torch.randn(8, 3, 4, 4)
    assert adapt_input_conv(w, 3) is w
    torch.testing.assert_close(adapt_input_conv(w, 1), w[:, 0:1] + w[:, 1:2] + w[:, 2:3])
    torch.testing.assert_close(adapt_input_conv(w, 4), torch.cat([w, w[:, :1]], 1) * 3 / 4)
    torch.testing.assert_close(adapt_input_conv(w, 5), torch.cat([w, w[:, :2]], 1) * 3 / 5)
    assert adapt_input_conv(w.half(), 4).dtype == torch.float16
    state = {"conv1.weight": w, "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3)}  # only the first conv changes
    out = adapt_input_channels(state, 1)
    assert out["conv1.weight"].shape == (8, 1, 4, 4) and out["layer1.0.conv1.weight"] is state["layer1.0.conv1.weight"]


def test_a_gray_image_through_the_1_channel_conv_equals_its_rgb_copy_through_the_3_channel_one():
    w, b = torch.randn(8, 3, 4, 4), torch.randn(8)
    gray = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(F.conv2d(gray, adapt_input_conv(w, 1), b, stride=4),
                               F.conv2d(gray.expand(-1, 3, -1, -1), w, b, stride=4))


def test_init_from_a_3_channel_export_adapts_the_patch_embedding(tmp_path):
    rgb = tiny_config()
    torch.manual_seed(0)
    backbone = backbone_from_config(rgb.backbone, drop_path=0.0)
    save_backbone(backbone, rgb, tmp_path / "backbone.safetensors")
    cfg = tiny_config(backbone={"in_chans": 4})
    init = resolve_init(cfg, str(tmp_path / "backbone.safetensors"))
    assert cfg.backbone.in_chans == 4 and cfg.init.mode == "backbone"
    method = build_method(cfg)
    init(method)
    want = adapt_input_conv(backbone.patch_embed.proj.weight.detach(), 4)
    for net in method.backbones():
        torch.testing.assert_close(net.patch_embed.proj.weight.detach(), want)
        torch.testing.assert_close(net.blocks[0].attn.qkv.weight.detach(), backbone.blocks[0].attn.qkv.weight.detach())


# ----- sources -----

def test_tiff_pages_or_samples_are_channels_and_16_bit_values_keep_their_scale(tmp_path):
    arrays = tiff_folder(tmp_path / "data", n=2)
    for path, a in arrays.items():
        x = decode(path, 4)
        assert x.dtype == torch.float32 and x.shape == (4, 20, 20)
        assert torch.equal((x.double() * 65535).round().long(), torch.from_numpy(a.astype(np.int64)))
    src = open_source(str(tmp_path / "data"))
    src.channels = 4
    assert src.classes == ["a", "b"] and src[0][0].shape == (4, 20, 20)


def test_16_bit_png_keeps_values_above_255_without_per_image_rescaling(tmp_path):
    values = np.array([[0, 255, 256, 257], [1000, 4095, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "wide.png")
    Image.fromarray(np.full((2, 4), 300, dtype=np.uint16)).save(tmp_path / "dim.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    x = decode(tmp_path / "wide.png", 1)
    assert x.shape == (1, 2, 4) and (x * 65535).round().long()[0].tolist() == values.tolist()
    assert torch.allclose(decode(tmp_path / "dim.png", 1) * 65535, torch.tensor(300.0))  # not stretched to 65535
    rgb = decode(tmp_path / "wide.png")  # a 3-channel run: the gray level copied to 3 channels, its range kept
    assert rgb.shape == (3, 2, 4) and torch.equal(rgb[2], x[0])


def test_npy_is_chw_or_hwc_by_the_channel_count_and_an_ambiguous_shape_is_an_error(tmp_path):
    a = np.random.default_rng(0).random((4, 6, 5), dtype=np.float32)
    np.save(tmp_path / "chw.npy", a)
    np.save(tmp_path / "hwc.npy", a.transpose(1, 2, 0))
    np.save(tmp_path / "gray.npy", (a[0] * 255).astype(np.uint8))
    np.save(tmp_path / "square.npy", np.zeros((4, 6, 4), dtype=np.float32))
    for name in ("chw", "hwc"):
        assert torch.equal(decode(tmp_path / f"{name}.npy", 4), torch.from_numpy(a))
    gray = decode(tmp_path / "gray.npy", 1)
    assert gray.dtype == torch.uint8 and gray.shape == (1, 6, 5)
    with pytest.raises(UserError, match=r"square.npy: an array of shape \(4, 6, 4\), ambiguous"):
        decode(tmp_path / "square.npy", 4)
    with pytest.raises(UserError, match="chw.npy: an array of shape .* neither"):
        decode(tmp_path / "chw.npy", 3)
    src = open_source(str(tmp_path))  # .npy files are images of a folder
    assert {f.name for f in src.files} == {"chw.npy", "hwc.npy", "gray.npy", "square.npy"}


def test_a_channel_count_the_backbone_does_not_take_is_one_error(tmp_path, monkeypatch):
    tiff_folder(tmp_path / "data", n=1)
    with pytest.raises(UserError, match=r"0.tif: 4 channel\(s\), but the backbone takes 3 \(backbone.in_chans=4"):
        decode(tmp_path / "data" / "a" / "0.tif", 3)
    digits = open_source("digits")  # shared by the process: its channels restored after the test
    monkeypatch.setattr(digits, "channels", 1)
    assert digits[0][0].shape == (1, 8, 8)  # the built-in grayscale sets keep their one channel
    digits.channels = 4
    with pytest.raises(UserError, match="1 channel"):
        digits[0]


def test_a_mismatch_met_in_a_loader_worker_is_the_workers_one_line(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    np.save(tmp_path / "z.npy", rng.random((4, 12, 12), dtype=np.float32))  # read with 3 channels: not an image
    src = open_source(str(tmp_path))
    assert src.channels == 3 and src.files[-1].name == "z.npy"
    c = CropsConfig(global_size=8, local_size=4, n_local=0)
    loader = epoch_loader(make_batches(src, MultiCrop(c, seed=0), global_batch=4), 0, 0, num_workers=1)
    with pytest.raises(UserError) as e:
        next(iter(loader))  # torch re-raises it in this process, its traceback as the message
    assert str(e.value) == (f"{tmp_path / 'z.npy'}: an array of shape (4, 12, 12), neither its first nor its last axis "
                            "of length backbone.in_chans = 3 (expected [3, H, W] or [H, W, 3]; [H, W] is one channel)")


def test_without_tifffile_a_multichannel_tiff_is_one_clear_line(tmp_path, monkeypatch):
    tiff_folder(tmp_path / "data", n=1)
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(UserError, match=r"needs tifffile: pip install 'selfsup\[tiff\]'"):
        decode(tmp_path / "data" / "a" / "1.tif", 4)


# ----- views and statistics -----

def test_multichannel_views_and_the_photometric_ops_they_take():
    c = CropsConfig(global_size=8, local_size=4, n_local=1, mean=(0.5,) * 4, std=(0.25,) * 4)
    img = torch.rand(4, 12, 12)
    views = MultiCrop(c, seed=0)([(img, 0, 0), ((img * 255).to(torch.uint8), 0, 1)], 0)
    assert views.global_crops.images.dtype == torch.float32 and views.global_crops.images.shape == (4, 4, 8, 8)
    assert views.global_crops.images.min() >= 0 and views.global_crops.images.max() <= 1
    x = torch.rand(1, 4, 3, 3)
    plain = (x - 0.5) / 0.25
    p = torch.zeros(1, N_PARAMS)
    p[0, Param.JITTER], p[0, Param.BRIGHTNESS], p[0, Param.CONTRAST] = 1, 1, 1
    p[0, Param.SATURATION], p[0, Param.HUE], p[0, Param.GRAYSCALE] = 0, 0.5, 1  # RGB's: skipped for 4 channels
    photometric = Photometric(c)
    torch.testing.assert_close(photometric(Crops(x, p)), plain)
    p[0, Param.CONTRAST] = 0  # contrast 0: each channel becomes its own mean
    want = (x.mean((2, 3), keepdim=True).expand_as(x) - 0.5) / 0.25
    torch.testing.assert_close(photometric(Crops(x, p)), want)


def test_auto_statistics_are_the_per_channel_moments_of_the_data(tmp_path):
    arrays = tiff_folder(tmp_path / "data", n=3)
    cfg = tiny_config(data={"source": str(tmp_path / "data")}, backbone={"in_chans": 4})
    src = open_source(str(tmp_path / "data"))
    fit_to_source(cfg, src)  # ImageNet's RGB defaults with 4 channels: computed
    pixels = np.stack(list(arrays.values())).astype(np.float64) / 65535
    np.testing.assert_allclose(cfg.crops.mean, pixels.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(cfg.crops.std, pixels.std((0, 2, 3)), rtol=1e-5)
    assert channel_stats(src) == (cfg.crops.mean, cfg.crops.std)


# ----- the commands -----

def test_a_4_channel_tiff_folder_trains_evaluates_and_embeds(tmp_path, capsys):
    tiff_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", *ARGS, "backbone.in_chans=4", "--data", str(tmp_path / "data"), "--out", str(run),
                 "--steps", "2"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["backbone"]["in_chans"] == 4 and len(saved["crops"]["mean"]) == len(saved["crops"]["std"]) == 4
    assert main(["eval", "knn", "--checkpoint", str(run), "--data", str(tmp_path / "data"), "--device", "cpu"]) == 0
    out = tmp_path / "emb.safetensors"
    assert main(["embed", "--checkpoint", str(run), "--data", str(tmp_path / "data"), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert load_file(str(out))["features"].shape == (20, 192)


def test_a_mean_of_the_wrong_length_is_exit_2_and_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "backbone.in_chans=4", "crops.mean=[0.5, 0.5]", "--steps", "1", "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["selfsup: error: bad value for 'crops.mean': [0.5, 0.5] (expected auto or 4 numbers, one per "
                     "channel (backbone.in_chans))"]
    assert not out.exists()


@pytest.mark.parametrize("argv", [["viz", "attention"], ["viz", "pca"], *(
    ["eval", p] for p in ("attention-masks", "segment", "depth", "video", "copydetect"))])
def test_rgb_pictures_and_dense_evaluations_of_a_4_channel_backbone_are_one_line(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)  # where pictures of a checkpoint outside a run folder would go
    cfg = tiny_config(backbone={"in_chans": 4}).backbone
    checkpoint = tmp_path / "four.safetensors"
    Loaded(backbone_from_config(cfg), cfg, 16, (0.5,) * 4, (0.25,) * 4, "test").save(checkpoint)
    assert main([*argv, "--checkpoint", str(checkpoint), "--data", "digits", "--device", "cpu"]) == 2
    what = " ".join(argv)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"selfsup: error: {what}: {checkpoint} takes 4 channel(s) (backbone.in_chans=4), but {what} reads 8-bit RGB "
        "images (knn, linear, lowshot, cluster, retrieval and embed read any channel count)"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["four.json", "four.safetensors"]  # nothing written


# ----- 3-channel RGB as before -----

def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


# computed by the code before this change (git worktree of 42ae5f4): global crops, local crops, their parameters,
# the normalised global and local crops, the evaluation views (these two since issue 13: torchvision's Resize +
# CenterCrop for every image, where small ones were resized straight to the size: data/views.py eval_geometry)
BEFORE = {
    "folder": ["695e155086ac2bb9", "e5d3ecf8c7aae87d", "8fc6a5a4c524cdba", "5de8fab3deaa52a2", "ad057728b42d6570",
               "68af8506e995efff"],
    "digits": ["ac5585a8c5f25623", "fc947605e73217fb", "8fc6a5a4c524cdba", "cb66365e47060a8b", "e95f673ef51061ab",
               "8c0231b8ac2cbc18"],
}


def test_rgb_crops_and_normalised_batches_are_bit_identical_to_before(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(tmp_path / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / "gray.png")
    c = CropsConfig(global_size=24, local_size=12, n_local=2, color_jitter=1.0, grayscale=0.5, blur=(1.0, 0.5, 0.5),
                    solarize=(0.5, 0.5, 0.5))
    for name, spec in (("folder", str(tmp_path)), ("digits", "digits")):
        src = open_source(spec)
        samples = [(*src[i], i) for i in range(7)]
        v = MultiCrop(c, seed=5)(samples, 3)
        photometric = Photometric(c)
        got = [digest(v.global_crops.images), digest(v.local_crops.images), digest(v.global_crops.params),
               digest(photometric(v.global_crops)), digest(photometric(v.local_crops)),
               digest(torch.stack([eval_transform(img, 20, c.mean, c.std) for img, _, _ in samples]))]
        assert got == BEFORE[name], name
