"""Official DINO/DINOv2 formats load strictly and give the reference architecture's outputs; exports round-trip.

The state dicts are written here in the official key formats with random values; the reference forward is
written here from the raw tensors (eager attention, no selfsup module)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import selfsup
from selfsup.config import Config
from selfsup.errors import UserError
from selfsup.weights import save_backbone

D, HEADS = 192, 3  # vit_tiny's width: the smallest that DINOv2's size table names


def randn(*shape, std=0.02):
    return torch.randn(*shape) * std


def vit_state(depth=2, patch=14, grid=37, swiglu=False, registers=0, layerscale=True, mask_token=True):
    """A ViT state dict in DINOv2's key format (DINO's without layer scale and mask token)."""
    sd = {"cls_token": randn(1, 1, D, std=1), "pos_embed": randn(1, 1 + grid * grid, D, std=1),
          "patch_embed.proj.weight": randn(D, 3, patch, patch), "patch_embed.proj.bias": randn(D)}
    if registers:
        sd["register_tokens"] = randn(1, registers, D, std=1)
    if mask_token:
        sd["mask_token"] = randn(1, D)
    hidden = (int(4 * D * 2 / 3) + 7) // 8 * 8  # DINOv2's SwiGLU width
    for i in range(depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = 1 + randn(D, std=0.1), randn(D, std=0.1)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = randn(3 * D, D, std=0.1), randn(3 * D)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = randn(D, D, std=0.1), randn(D)
        if layerscale:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = randn(D, std=0.5), randn(D, std=0.5)
        if swiglu:
            sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"] = randn(2 * hidden, D, std=0.1), randn(2 * hidden)
            sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"] = randn(D, hidden, std=0.1), randn(D)
        else:
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = randn(4 * D, D, std=0.1), randn(4 * D)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = randn(D, 4 * D, std=0.1), randn(D)
    sd["norm.weight"], sd["norm.bias"] = 1 + randn(D, std=0.1), randn(D, std=0.1)
    return sd


def ref_pos_embed(pos, h0, w0, square, offset, antialias):
    """DINO/DINOv2 interpolate_pos_encoding: untouched for a square image of the native grid; otherwise a
    bicubic resize of the grid, by the factor (n + offset) / M, or to the size when offset is 0."""
    n = pos.shape[1] - 1
    m = int(math.sqrt(n))
    if h0 * w0 == n and square:
        return pos
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
                             antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)


def ref_vit(sd, x, offset=0.1, antialias=False):
    """[CLS] and patch tokens of the reference ViT, from the raw tensors."""
    b, _, h, w = x.shape
    patch = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1)
    t = t + ref_pos_embed(sd["pos_embed"], h // patch, w // patch, h == w, offset, antialias)
    r = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if r:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    n, hd = t.shape[1], D // HEADS
    one = torch.ones(D)
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias"))
        q, k, v = qkv.reshape(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(hd)).softmax(-1) @ v
        y = F.linear(a.transpose(1, 2).reshape(b, n, D), p("attn.proj.weight"), p("attn.proj.bias"))
        t = t + y * sd.get(f"blocks.{i}.ls1.gamma", one)
        y = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        if f"blocks.{i}.mlp.w12.weight" in sd:
            y1, y2 = F.linear(y, p("mlp.w12.weight"), p("mlp.w12.bias")).chunk(2, -1)
            y = F.linear(F.silu(y1) * y2, p("mlp.w3.weight"), p("mlp.w3.bias"))
        else:
            y = F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias")))
            y = F.linear(y, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + y * sd.get(f"blocks.{i}.ls2.gamma", one)
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 0], t[:, 1 + r:]


def save(obj, path):
    torch.save(obj, path)
    return path


def assert_matches(loaded, sd, x, **interp):
    cls, patches = ref_vit(sd, x, **interp)
    with torch.no_grad():
        out = loaded.backbone.forward_features(x)
    torch.testing.assert_close(out["x_norm_clstoken"], cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["x_norm_patchtokens"], patches, rtol=1e-4, atol=1e-4)


def test_dinov2_reg_swiglu_format_loads_strictly_and_matches_reference(tmp_path):
    torch.manual_seed(0)
    sd = vit_state(swiglu=True, registers=4)
    loaded = selfsup.load(save(sd, tmp_path / "dinov2_vitg14_reg4_pretrain.pth"))
    c = loaded.config
    assert (c.arch, c.patch_size, c.depth, c.img_size, c.ffn, c.n_registers) == ("vit_tiny", 14, 2, 518, "swiglu", 4)
    assert (c.interpolate_antialias, c.interpolate_offset) == (True, 0.0)  # DINOv2 hubconf for `_reg` models
    assert loaded.image_size == 224 and not loaded.backbone.training
    own = loaded.backbone.state_dict()
    assert own.keys() == sd.keys() and all(torch.equal(own[k], v) for k, v in sd.items())
    # 224 px (16 x 16 patches, resampled), 518 px (the native 37 x 37 grid), and a non-square image
    for h, w in [(224, 224), (518, 518), (224, 322)]:
        assert_matches(loaded, sd, torch.randn(1, 3, h, w), offset=0.0, antialias=True)


def test_dinov2_format_without_registers_uses_the_offset(tmp_path):
    torch.manual_seed(1)
    sd = vit_state()
    loaded = selfsup.load(save(sd, tmp_path / "dinov2_vits14_pretrain.pth"))
    assert (loaded.config.ffn, loaded.config.n_registers, loaded.config.layerscale) == ("mlp", 0, 1e-5)
    assert (loaded.config.interpolate_antialias, loaded.config.interpolate_offset) == (False, 0.1)
    x = torch.randn(2, 3, 224, 280)
    assert_matches(loaded, sd, x, offset=0.1, antialias=False)
    # the two resampling modes differ: matching the right one matters
    cls_other, _ = ref_vit(sd, x, offset=0.0, antialias=True)
    assert not torch.allclose(loaded.backbone(x), cls_other, atol=1e-4)


@pytest.mark.parametrize("patch,grid", [(16, 14), (8, 28)])  # DINO ViT-S/16 (197 positions), ViT-S/8 (785)
def test_dino_vit_format(tmp_path, patch, grid):
    torch.manual_seed(2)
    sd = vit_state(depth=1, patch=patch, grid=grid, layerscale=False, mask_token=False)
    loaded = selfsup.load(save(sd, tmp_path / "dino_deitsmall_pretrain.pth"))
    assert (loaded.config.patch_size, loaded.config.img_size, loaded.config.layerscale) == (patch, 224, None)
    for size in [(224, 224), (160, 96)]:
        assert_matches(loaded, sd, torch.randn(1, 3, *size))


def test_training_checkpoints_give_the_teacher_backbone(tmp_path):
    torch.manual_seed(3)
    teacher, student = vit_state(depth=3), vit_state(depth=3)
    x = torch.randn(1, 3, 112, 112)
    want = ref_vit(teacher, x)[0]
    head = {"head.mlp.0.weight": randn(8, D), "head.last_layer.weight_g": torch.ones(8, 1)}
    # DINO: checkpoint.pth with student (DDP) and teacher, heads, and pickled args
    dino = {"student": {f"module.backbone.{k}": v for k, v in student.items()}
            | {f"module.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in teacher.items()} | head,
            "epoch": 10, "args": argparse.Namespace(arch="vit_small")}
    # DINOv2: teacher dump with chunked blocks (BlockChunk keeps the global block index) and untied heads
    chunked = {k.replace("blocks.", f"blocks.{int(k.split('.')[1]) // 2}.", 1) if k.startswith("blocks.") else k: v
               for k, v in teacher.items()}
    assert "blocks.1.2.norm1.weight" in chunked
    dinov2 = {"teacher": {f"backbone.{k}": v for k, v in chunked.items()} | {"dino_head.mlp.0.weight": randn(8, D)}}
    # DINOv2: a training checkpoint of the whole model
    model = {"model": {f"student.backbone.{k}": v for k, v in student.items()}
             | {f"teacher.backbone.{k}": v for k, v in teacher.items()}, "iteration": 7}
    for name, obj in [("dino", dino), ("dinov2", dinov2), ("model", model)]:
        loaded = selfsup.load(save(obj, tmp_path / f"{name}.pth"))
        with torch.no_grad():
            torch.testing.assert_close(loaded.backbone(x), want, rtol=1e-4, atol=1e-4)


def test_ibot_names_are_understood(tmp_path):
    torch.manual_seed(4)
    sd = vit_state(depth=1, patch=16, grid=14)
    ibot = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in sd.items()}
    ibot["masked_embed"] = ibot.pop("mask_token")[0]
    loaded = selfsup.load(save({"teacher": {f"backbone.{k}": v for k, v in ibot.items()}}, tmp_path / "ibot.pth"))
    assert torch.equal(loaded.backbone.mask_token, sd["mask_token"])
    assert_matches(loaded, sd, torch.randn(1, 3, 224, 224))


def resnet50_state():
    """torchvision's ResNet-50 keys (as DINO's release), without fc, with random weights and statistics."""
    sd = {}

    def conv_bn(name, bn, c_out, c_in, k):
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k) * math.sqrt(1.0 / (c_in * k * k))
        sd[f"{bn}.weight"], sd[f"{bn}.bias"] = 0.5 + torch.rand(c_out) * 0.5, randn(c_out, std=0.1)
        sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"] = randn(c_out, std=0.1), 0.5 + torch.rand(c_out)
        sd[f"{bn}.num_batches_tracked"] = torch.tensor(100)

    conv_bn("conv1", "bn1", 64, 3, 7)
    c = 64
    for s, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        for j in range(n):
            b = f"layer{s}.{j}."
            conv_bn(b + "conv1", b + "bn1", width, c, 1)
            conv_bn(b + "conv2", b + "bn2", width, width, 3)
            conv_bn(b + "conv3", b + "bn3", 4 * width, width, 1)
            if j == 0:
                conv_bn(b + "downsample.0", b + "downsample.1", 4 * width, c, 1)
            c = 4 * width
    return sd


def ref_resnet50(sd, x):
    """torchvision's ResNet-50 forward (v1.5: the stride in the 3x3 conv), up to the pooled features."""
    def bn(t, name):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    t = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for s, n in enumerate((3, 4, 6, 3), 1):
        for j in range(n):
            b = f"layer{s}.{j}."
            stride = 2 if s > 1 and j == 0 else 1
            y = F.relu(bn(F.conv2d(t, sd[b + "conv1.weight"]), b + "bn1"))
            y = F.relu(bn(F.conv2d(y, sd[b + "conv2.weight"], stride=stride, padding=1), b + "bn2"))
            y = bn(F.conv2d(y, sd[b + "conv3.weight"]), b + "bn3")
            if j == 0:
                t = bn(F.conv2d(t, sd[b + "downsample.0.weight"], stride=stride), b + "downsample.1")
            t = F.relu(y + t)
    return t.mean((2, 3))


def test_dino_resnet50_format(tmp_path):
    torch.manual_seed(5)
    sd = resnet50_state()
    x = torch.randn(2, 3, 64, 48)
    want = ref_resnet50(sd, x)
    # the released backbone, and the teacher of a DINO checkpoint (DDP-wrapped, as it is for BatchNorm models)
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}
            | {"module.head.mlp.0.weight": randn(8, 2048)}}
    for name, obj in [("dino_resnet50_pretrain.pth", sd), ("checkpoint.pth", ckpt)]:
        loaded = selfsup.load(save(obj, tmp_path / name))
        assert (loaded.config.arch, loaded.config.cifar_stem, loaded.backbone.embed_dim) == ("resnet50", False, 2048)
        with torch.no_grad():
            torch.testing.assert_close(loaded.backbone(x), want, rtol=1e-4, atol=1e-4)
    assert not loaded.backbone.training  # BatchNorm uses the running statistics


def tiny_config(**backbone) -> Config:
    cfg = Config()
    cfg.backbone.arch, cfg.backbone.depth, cfg.backbone.patch_size, cfg.backbone.img_size = "vit_tiny", 2, 8, 32
    for k, v in backbone.items():
        setattr(cfg.backbone, k, v)
    cfg.crops.global_size, cfg.crops.mean, cfg.crops.std = 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return cfg


@pytest.mark.parametrize("backbone", [dict(n_registers=2, ffn="swiglu", layerscale=1e-5),
                                      dict(arch="resnet18", cifar_stem=True)])
def test_export_round_trip_is_bit_identical(tmp_path, backbone):
    torch.manual_seed(6)
    cfg = tiny_config(**backbone)
    net = selfsup.nn.backbone_from_config(cfg.backbone, drop_path=0.0).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    (tmp_path / "run").mkdir()
    save_backbone(net, cfg, tmp_path / "run" / "backbone.safetensors")
    x = torch.randn(3, 3, 32, 32)
    for where in [tmp_path / "run", tmp_path / "run" / "backbone.safetensors"]:
        loaded = selfsup.load(where)
        assert (loaded.image_size, loaded.mean, loaded.std) == (32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        with torch.no_grad():
            assert torch.equal(loaded.backbone(x), net(x))


def test_official_load_exports_and_has_a_random_init(tmp_path):
    torch.manual_seed(7)
    sd = vit_state(depth=1, registers=4)
    loaded = selfsup.load(save(sd, tmp_path / "official.pth"))
    loaded.save(tmp_path / "exported.safetensors")
    again = selfsup.load(tmp_path / "exported.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(again.backbone(x), loaded.backbone(x))
        fresh = loaded.random_init(seed=0)
        assert fresh.state_dict().keys() == loaded.backbone.state_dict().keys()
        assert fresh(x).shape == (1, D) and not torch.allclose(fresh(x), loaded.backbone(x))
        assert torch.equal(fresh.pos_embed, loaded.random_init(seed=0).pos_embed)  # seeded
    # official weights converted to plain safetensors load by their keys too
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "plain.safetensors"))
    with torch.no_grad():
        assert torch.equal(selfsup.load(tmp_path / "plain.safetensors").backbone(x), loaded.backbone(x))


def test_selfsup_checkpoint_loads_the_methods_backbone(tmp_path):
    from selfsup.config import to_dict
    from selfsup.methods import build_method

    torch.manual_seed(8)
    cfg = tiny_config()
    cfg.dino.out_dim, cfg.dino.hidden_dim, cfg.dino.bottleneck_dim = 16, 32, 8
    method = build_method(cfg)
    state = {"config": to_dict(cfg), "method_state": method.state_dict(), "step": 1}
    save(state, tmp_path / "checkpoint-00000001.pt")
    x = torch.randn(2, 3, 32, 32)
    for where in [tmp_path, tmp_path / "checkpoint-00000001.pt"]:
        with torch.no_grad():
            assert torch.equal(selfsup.load(where).backbone(x), method.backbone().eval()(x))


def test_clear_errors_name_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    bad_shape = vit_state(depth=1)
    bad_shape["blocks.0.attn.proj.weight"] = randn(D, D + 1)
    extra = vit_state(depth=1) | {"blocks.0.attn.extra": randn(3)}
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    cases = {
        tmp_path / "missing.pth": "no such file",
        tmp_path / "notes.txt": "expected a selfsup run folder",
        tmp_path / "empty": "expected a selfsup run folder",
        save({"weights": torch.zeros(3)}, tmp_path / "other.pth"): "expected a selfsup run folder",
        tmp_path / "other.safetensors": "expected a selfsup run folder",
        save(bad_shape, tmp_path / "bad_shape.pth"): "blocks.0.attn.proj.weight (192, 193)",
        save(extra, tmp_path / "extra.pth"): "unexpected ['blocks.0.attn.extra']",
        save(vit_state(depth=1, grid=5) | {"cls_token": randn(1, 1, 100)}, tmp_path / "w.pth"): "100 wide",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            selfsup.load(path)
