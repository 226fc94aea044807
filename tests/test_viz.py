"""Attention maps, the 60 %-mass masks, PCA of patch features; the `viz` commands end to end on a tiny ViT."""
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.nn.vit import VisionTransformer
from selfsup.viz.attention import cls_attention, mass_mask
from selfsup.viz.pca import otsu, patch_pca


def smallest_set_size(weights: np.ndarray, mass: float) -> int:
    """By brute force: the size of the smallest subset whose share of the total is at least `mass`."""
    share = weights / weights.sum()
    for size in range(1, len(share) + 1):
        if any(share[list(c)].sum() >= mass for c in itertools.combinations(range(len(share)), size)):
            return size
    raise AssertionError


def test_mass_mask_keeps_the_smallest_set_holding_the_mass():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.rand(9, generator=g) ** 3
        keep = mass_mask(a, 0.6)
        share = a / a.sum()
        assert share[keep].sum() >= 0.6
        assert int(keep.sum()) == smallest_set_size(a.numpy(), 0.6)
        assert share[keep].min() >= share[~keep].max()  # the largest entries
    assert mass_mask(torch.tensor([0.3, 0.3, 0.4]), 0.6).tolist() == [True, False, True]  # 0.4 + 0.3 >= 0.6
    rows = mass_mask(torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]]), 0.6)
    assert rows.sum(1).tolist() == [1, 3]  # row-wise


def tiny_vit(n_registers: int = 0) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             n_registers=n_registers).eval()


def test_cls_attention_leaves_registers_out_of_the_map():
    vit = tiny_vit(n_registers=3)
    x = torch.randn(3, 32, 48)
    patches, registers = cls_attention(vit, x)
    assert patches.shape == (2, 4, 6) and registers.shape == (2, 3)
    full = vit.get_last_self_attention(x[None])[0, :, 0]  # [CLS] row: [CLS], 3 registers, 24 patches
    assert torch.allclose(patches.flatten(1), full[:, 4:]) and torch.allclose(registers, full[:, 1:4])
    assert torch.allclose(patches.flatten(1).sum(1) + registers.sum(1) + full[:, 0], torch.ones(2), atol=1e-5)


def test_pca_separates_a_foreground_that_differs_from_the_border():
    grid = (6, 6)
    fg = torch.zeros(grid, dtype=torch.bool)
    fg[2:4, 1:5] = True
    g = torch.Generator().manual_seed(0)
    feats = [torch.where(fg.flatten()[:, None], torch.tensor([3.0, 0, 0, 0]), torch.zeros(4))
             + 0.1 * torch.randn(36, 4, generator=g) for _ in range(2)]
    firsts, fgs, rgbs = patch_pca(feats, [grid, grid])
    for f, m, c in zip(firsts, fgs, rgbs):
        assert torch.equal(m, fg)  # found, and with the sign that puts the border in the background
        assert c.shape == (6, 6, 3) and (c[~fg] == 0).all() and c[fg].max() <= 1
    v = np.r_[np.zeros(50), np.ones(30)]
    assert ((v >= otsu(v)) == (v == 1)).all()
    v = np.random.default_rng(0).normal(np.r_[np.zeros(300), np.full(100, 4.0)], 0.5)
    assert 1.0 < otsu(v) < 3.0  # between the two modes


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from selfsup.config import Config
    from selfsup.nn import backbone_from_config
    from selfsup.weights import save_backbone

    d = tmp_path_factory.mktemp("export")
    cfg = Config()
    cfg.backbone.arch, cfg.backbone.patch_size, cfg.backbone.depth, cfg.backbone.img_size = "vit_tiny", 8, 1, 32
    cfg.backbone.n_registers = 2
    cfg.crops.global_size = 32
    torch.manual_seed(0)
    save_backbone(backbone_from_config(cfg.backbone), cfg, d / "b.safetensors")
    return d / "b.safetensors"


def test_viz_commands_write_pngs_for_files_and_builtin_data(export, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    img = tmp_path / "imgs" / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 80, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["viz", "attention", str(img), "--checkpoint", str(export), "--data", "digits", "--n", "2",
                 "--out", str(tmp_path / "v"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["heads"] == 3 and r["registers"] == 2 and len(r["images"]) == 3
    assert r["images"][0]["grid"] == [4, 8]  # shorter side 32, aspect kept, whole patches
    assert Image.open(r["png"]).size[0] > 200
    assert main(["viz", "pca", str(tmp_path / "imgs"), "--checkpoint", str(export), "--out", str(tmp_path / "v"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [i["image"] for i in r["images"]] == ["photo"] and Image.open(r["png"]).size[0] > 100
    assert main(["viz", "pca", "--checkpoint", str(export)]) == 2  # no images: a one-line error
    assert "no images" in capsys.readouterr().err
