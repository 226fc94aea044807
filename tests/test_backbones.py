"""The backbone family: DINOv2's ViT sizes (parameter counts as released), patch sizes, registers, LayerScale,
SwiGLU, drop path, mask token; ResNets with torchvision's names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import selfsup
from selfsup.config import BackboneConfig
from selfsup.errors import UserError
from selfsup.nn import backbone_from_config


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def vit_count(dim: int, depth: int, patch: int, grid: int, registers: int = 0, swiglu: bool = False) -> int:
    """Parameters of DINOv2's ViT by hand: patch embedding, [CLS] + positions + mask token + registers,
    per block two LayerNorms, qkv, proj, two LayerScales and the FFN; the final LayerNorm."""
    tokens = dim * (1 + (1 + grid * grid) + 1 + registers)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
    ffn = (dim * 2 * hidden + 2 * hidden + hidden * dim + dim) if swiglu else (8 * dim * dim + 5 * dim)
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + ffn
    return dim * 3 * patch * patch + dim + tokens + depth * block + 2 * dim


@pytest.mark.parametrize("name,swiglu,millions", [
    ("vit_small", False, 22.06), ("vit_base", False, 86.58), ("vit_large", False, 304.37),
    ("vit_giant2", True, 1136.48),  # DINOv2 ViT-g/14: SwiGLU FFN, 2/3 of 4 D wide
])
def test_dinov2_parameter_counts_on_meta_device(name, swiglu, millions):
    size = selfsup.nn.VIT_SIZES[name]
    for registers in (0, 4):
        with torch.device("meta"):  # no memory for the weights
            m = selfsup.build_backbone(name, patch_size=14, img_size=518, layerscale=1e-5, n_registers=registers,
                                       ffn="swiglu" if swiglu else "mlp")
        assert n_params(m) == vit_count(size.embed_dim, size.depth, 14, 37, registers, swiglu)
        if registers == 0:
            assert round(n_params(m) / 1e6, 2) == millions  # the released models' sizes
    if swiglu:
        assert m.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536) and m.blocks[0].mlp.w3.weight.shape == (1536, 4096)


@pytest.mark.parametrize("patch", [8, 14, 16])
def test_any_patch_size_registers_and_outputs(patch):
    torch.manual_seed(0)
    m = selfsup.build_backbone("vit_tiny", patch_size=patch, depth=2, img_size=8 * patch, n_registers=3).eval()
    out = m.forward_features(torch.randn(2, 3, 4 * patch, 6 * patch))
    assert out["x_norm_clstoken"].shape == (2, 192) and out["x_norm_regtokens"].shape == (2, 3, 192)
    assert out["x_norm_patchtokens"].shape == (2, 24, 192) and out["x_prenorm"].shape == (2, 28, 192)
    x = torch.randn(1, 3, 2 * patch, 2 * patch)
    last = m.intermediate_outputs(x, n=2)
    assert len(last) == 2 and torch.allclose(last[-1]["x_norm_clstoken"], m(x), atol=1e-6)
    attn = m.get_last_self_attention(x)
    assert attn.shape == (1, 3, 1 + 3 + 4, 1 + 3 + 4)  # heads, [CLS] + registers + patches
    assert torch.allclose(attn.sum(-1), torch.ones(1, 3, 8), atol=1e-5)


def test_layerscale_and_swiglu_build_dinov2s_modules():
    m = selfsup.build_backbone("vit_small", patch_size=14, depth=1, layerscale=1e-5, ffn="swiglu")
    blk = m.blocks[0]
    assert torch.equal(blk.ls1.gamma, torch.full((384,), 1e-5)) and torch.equal(blk.ls2.gamma, blk.ls1.gamma)
    assert {k for k in m.state_dict() if k.startswith("blocks.0.mlp")} == {
        "blocks.0.mlp.w12.weight", "blocks.0.mlp.w12.bias", "blocks.0.mlp.w3.weight", "blocks.0.mlp.w3.bias"}
    plain = selfsup.build_backbone("vit_small", depth=1)
    assert isinstance(plain.blocks[0].ls1, nn.Identity) and hasattr(plain.blocks[0].mlp, "fc1")


def test_drop_path_is_identity_in_eval_mode():
    torch.manual_seed(0)
    m = selfsup.build_backbone("vit_tiny", patch_size=8, depth=2, img_size=32, drop_path_rate=0.5,
                               drop_path_uniform=True, layerscale=0.5)
    ref = selfsup.build_backbone("vit_tiny", patch_size=8, depth=2, img_size=32, drop_path_rate=0.0, layerscale=0.5)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x), m(x)) and torch.allclose(m(x), ref.eval()(x), atol=1e-6)
        m.train()
        assert not torch.allclose(m(x), ref(x), atol=1e-3)  # in training some residual branches are dropped


def test_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    m = selfsup.build_backbone("vit_tiny", patch_size=8, depth=1, img_size=32).eval()
    nn.init.normal_(m.mask_token)
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    b[..., :8, :8] = a[..., :8, :8]  # the first patch is the same
    all_but_first = torch.ones(1, 16, dtype=torch.bool)
    all_but_first[0, 0] = False
    with torch.no_grad():
        fa, fb = m.forward_features(a, all_but_first), m.forward_features(b, all_but_first)
        assert torch.allclose(fa["x_norm_clstoken"], fb["x_norm_clstoken"], atol=1e-6)
        assert not torch.allclose(m(a), m(b), atol=1e-3)


def test_position_embedding_untouched_on_the_native_grid_only():
    m = selfsup.build_backbone("vit_tiny", patch_size=14, depth=1, img_size=518)
    assert m.interpolate_pos_encoding(518, 518) is m.pos_embed
    assert m.interpolate_pos_encoding(224, 224).shape == (1, 1 + 16 * 16, 192)
    assert m.interpolate_pos_encoding(224, 336).shape == (1, 1 + 16 * 24, 192)
    assert torch.equal(m.interpolate_pos_encoding(224, 336)[:, 0], m.pos_embed[:, 0])  # [CLS] keeps its own


def test_resnets_have_torchvisions_names_and_no_fc():
    counts = {"resnet18": (11_176_512, 512), "resnet50": (23_508_032, 2048)}  # torchvision's, less fc
    for name, (count, dim) in counts.items():
        with torch.device("meta"):
            m = selfsup.build_backbone(name)
        assert (n_params(m), m.embed_dim) == (count, dim)
        keys = m.state_dict().keys()
        assert not any(k.startswith("fc.") for k in keys)
        assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer4.1.bn2.weight"} <= keys
        assert ("layer2.0.downsample.0.weight" in keys) and ("layer1.0.downsample.0.weight" in keys) == (dim == 2048)
    m = selfsup.build_backbone("resnet50")
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)  # v1.5


def test_resnet_forward_and_cifar_stem():
    torch.manual_seed(0)
    m = backbone_from_config(BackboneConfig(arch="resnet18", cifar_stem=True)).eval()
    assert m.conv1.weight.shape == (64, 3, 3, 3) and isinstance(m.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m.forward_features(x)
        assert out["x_norm_patchtokens"].shape == (2, 16, 512)  # 32 / 8 = 4 x 4 cells
        assert torch.allclose(m(x), out["x_norm_clstoken"]) and m(x).shape == (2, 512)
        assert torch.allclose(out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1), atol=1e-6)
    imagenet = selfsup.build_backbone("resnet18")
    assert imagenet.conv1.weight.shape == (64, 3, 7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert imagenet.feature_map(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(m)  # what DDP training does with BatchNorm
    assert sum(isinstance(x, nn.SyncBatchNorm) for x in sync.modules()) == 20


def test_config_reaches_the_backbone():
    b = BackboneConfig(arch="vit_tiny", patch_size=14, depth=1, img_size=518, n_registers=4,
                       interpolate_antialias=True, interpolate_offset=0.0)
    m = backbone_from_config(b)
    assert (m.interpolate_antialias, m.interpolate_offset, m.register_tokens.shape) == (True, 0.0, (1, 4, 192))


def test_unknown_backbone_names():
    with pytest.raises(UserError, match="unknown backbone 'vit_huge'.*vit_giant2.*resnet50"):
        selfsup.build_backbone("vit_huge")
    with pytest.raises(UserError, match="unknown backbone 'resnet152'"):
        selfsup.build_backbone("resnet152")


def test_get_intermediate_layers_as_dinov2_returns_them():
    """torch.hub's DINOv2 shapes: patch maps [B, D, h, w] and [CLS] [B, D] per block, equal to the forward pass."""
    torch.manual_seed(0)
    m = selfsup.build_backbone("vit_tiny", patch_size=8, depth=3, img_size=32, n_registers=2).eval()
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        out = m.forward_features(x)
        maps = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, norm=True)
        flat = m.get_intermediate_layers(x, n=[0, 2])
        raw = m.get_intermediate_layers(x, n=1, norm=False)
    assert len(maps) == 2 and maps[-1][0].shape == (2, 192, 3, 5) and maps[-1][1].shape == (2, 192)
    assert torch.allclose(maps[-1][1], out["x_norm_clstoken"], atol=1e-6)
    patch = out["x_norm_patchtokens"]  # [B, 15, D] in row-major order of the 3 x 5 grid
    assert torch.allclose(maps[-1][0].permute(0, 2, 3, 1).reshape(2, 15, 192), patch, atol=1e-6)
    assert isinstance(flat, tuple) and len(flat) == 2 and torch.allclose(flat[1], patch, atol=1e-6)
    assert torch.allclose(raw[0], out["x_prenorm"][:, 3:], atol=1e-6)  # before the norm, registers left out
