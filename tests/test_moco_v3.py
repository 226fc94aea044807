"""MoCo v3's ViT-S/16 (recipe moco_imagenet) against plain restatements of facebookresearch/moco-v3: the parameter
names and shapes vits.py (`vit_small`) and builder.py (`MoCo_ViT`, `_build_mlp`) build, the fixed 2-D sin-cos
position embedding (vits.py `build_2d_sincos_position_embedding`), the frozen patch projection (main_moco.py
--stop-grad-conv1), the init (vits.py `VisionTransformerMoCo.__init__`) and AdamW decaying every parameter
(main_moco.py `torch.optim.AdamW(model.parameters(), ...)`)."""
import math

import pytest
import torch

from selfsup import load
from selfsup.cli import main
from selfsup.config import Config, load_recipe
from selfsup.methods import build_method
from selfsup.methods.base import Batch
from selfsup.nn import build_backbone
from selfsup.training.optim import build_optimizer, set_schedule
from selfsup.training.schedules import Schedules
from tiny import losses, tiny_config

D, DEPTH, HEADS, PATCH, GRID = 384, 12, 12, 16, 14  # vits.py vit_small at 224 px
MLP_DIM, DIM = 4096, 256  # main_moco.py --moco-mlp-dim, --moco-dim


def reference_mlp(prefix: str, num_layers: int, input_dim: int, mlp_dim: int, output_dim: int) -> dict:
    """builder.py `_build_mlp` (last_bn=True, as MoCo_ViT builds both MLPs): per layer a bias-free Linear; a
    BatchNorm1d (weight, bias) and a ReLU after every hidden one; a BatchNorm1d(affine=False), no parameters, last."""
    shapes, index = {}, 0
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        shapes[f"{prefix}.{index}.weight"] = (dim2, dim1)
        index += 1
        if layer < num_layers - 1:
            shapes[f"{prefix}.{index}.weight"] = (dim2,)
            shapes[f"{prefix}.{index}.bias"] = (dim2,)
            index += 2  # BatchNorm1d, ReLU
    return shapes


def reference_parameters() -> dict[str, tuple[int, ...]]:
    """MoCo_ViT(vit_small)'s base encoder (timm's VisionTransformer with head = the projector) and predictor,
    by their names in that module."""
    shapes = {"base_encoder.cls_token": (1, 1, D), "base_encoder.pos_embed": (1, 1 + GRID * GRID, D),
              "base_encoder.patch_embed.proj.weight": (D, 3, PATCH, PATCH), "base_encoder.patch_embed.proj.bias": (D,)}
    for i in range(DEPTH):
        b = f"base_encoder.blocks.{i}"
        shapes.update({f"{b}.norm1.weight": (D,), f"{b}.norm1.bias": (D,),
                       f"{b}.attn.qkv.weight": (3 * D, D), f"{b}.attn.qkv.bias": (3 * D,),
                       f"{b}.attn.proj.weight": (D, D), f"{b}.attn.proj.bias": (D,),
                       f"{b}.norm2.weight": (D,), f"{b}.norm2.bias": (D,),
                       f"{b}.mlp.fc1.weight": (4 * D, D), f"{b}.mlp.fc1.bias": (4 * D,),
                       f"{b}.mlp.fc2.weight": (D, 4 * D), f"{b}.mlp.fc2.bias": (D,)})
    shapes.update({"base_encoder.norm.weight": (D,), "base_encoder.norm.bias": (D,)})
    shapes.update(reference_mlp("base_encoder.head", 3, D, MLP_DIM, DIM))  # projector
    shapes.update(reference_mlp("predictor", 2, DIM, MLP_DIM, DIM))
    return shapes


REFERENCE_FROZEN = {"base_encoder.pos_embed", "base_encoder.patch_embed.proj.weight",
                    "base_encoder.patch_embed.proj.bias"}


def reference_name(selfsup_name: str) -> str:
    """selfsup's student keys under MoCo v3's names."""
    for ours, theirs in (("backbone.", "base_encoder."), ("projector.mlp.", "base_encoder.head."),
                         ("predictor.mlp.", "predictor.")):
        if selfsup_name.startswith(ours):
            return theirs + selfsup_name[len(ours):]
    raise AssertionError(selfsup_name)


def reference_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """build_2d_sincos_position_embedding, one number at a time: meshgrid(arange(w), arange(h)) with 'ij' indexing
    flattened gives patch k the coordinates grid_w = k // h and grid_h = k % h; its row is sin(grid_w omega),
    cos(grid_w omega), sin(grid_h omega), cos(grid_h omega) with omega_d = 1 / temperature^(d / (dim / 4));
    a zero row for [CLS] in front."""
    quarter = dim // 4
    omega = [1.0 / temperature ** (d / quarter) for d in range(quarter)]
    rows = [[0.0] * dim]
    for k in range(w * h):
        gw, gh = k // h, k % h
        rows.append([math.sin(gw * o) for o in omega] + [math.cos(gw * o) for o in omega]
                    + [math.sin(gh * o) for o in omega] + [math.cos(gh * o) for o in omega])
    return torch.tensor([rows], dtype=torch.float64)


@pytest.fixture(scope="module")
def recipe() -> Config:
    cfg = Config()
    load_recipe(cfg, "moco_imagenet")
    return cfg


@pytest.fixture(scope="module")
def moco(recipe):
    torch.manual_seed(0)
    return build_method(recipe)


def test_recipe_is_moco_v3_vit_small_with_its_hyper_parameters(recipe):
    b, o = recipe.backbone, recipe.optim
    assert (b.arch, b.num_heads, b.patch_size, b.img_size, b.pos_embed, b.freeze_patch_embed, b.init) == (
        "vit_small", 12, 16, 224, "sincos", True, "xavier")
    assert (recipe.moco.version, recipe.moco.temperature, recipe.moco.hidden_dim, recipe.moco.out_dim,
            recipe.moco.n_layers, recipe.moco.pred_hidden_dim) == (3, 0.2, 4096, 256, 3, 4096)
    assert (recipe.moco.momentum, recipe.moco.momentum_end) == (0.99, 1.0)
    assert (o.optimizer, o.lr, o.batch_size, o.lr_base_batch, o.epochs, o.warmup_epochs, o.min_lr) == (
        "adamw", 1.5e-4, 4096, 256, 300, 40, 0.0)
    assert (o.weight_decay, o.weight_decay_end, o.decay_all, o.clip_grad, o.betas) == (
        0.1, 0.1, True, 0.0, (0.9, 0.999))
    assert recipe.crops.global_scale == (0.08, 1.0) and recipe.crops.n_local == 0


def test_parameter_names_and_shapes_are_moco_v3_vit_small(moco):
    ours = {}
    for part, module in moco.student.items():
        ours.update({f"{part}.{n}": (tuple(p.shape), p.requires_grad) for n, p in module.named_parameters()})
    # iBOT's mask token is part of selfsup's ViT; MoCo never uses it (no gradient, checked below)
    assert ours.pop("backbone.mask_token") == ((1, D), True)
    mapped = {reference_name(n): shape for n, (shape, _) in ours.items()}
    assert mapped == reference_parameters()
    assert {reference_name(n) for n, (_, grad) in ours.items() if not grad} == REFERENCE_FROZEN
    # the momentum encoder: the base encoder and its head again, nothing trained
    target = {reference_name(f"{part}.{n}").replace("base_encoder.", "momentum_encoder."): tuple(p.shape)
              for part, module in moco.teacher.items() for n, p in module.named_parameters() if n != "mask_token"}
    assert target == {k.replace("base_encoder.", "momentum_encoder."): v for k, v in reference_parameters().items()
                      if k.startswith("base_encoder.")}
    # both MLPs end with a BatchNorm without affine (MoCo_ViT: _build_mlp's last_bn=True for both)
    for mlp in (moco.student["projector"].mlp, moco.student["predictor"].mlp):
        assert isinstance(mlp[-1], torch.nn.BatchNorm1d) and not mlp[-1].affine
        assert all(m.bias is None for m in mlp if isinstance(m, torch.nn.Linear))
    # timm's ViT-S/16: 22,050,664 parameters with its 1000-class head (385,000), which MoCo replaces
    backbone = [s for k, s in reference_parameters().items() if k.startswith("base_encoder.") and ".head." not in k]
    assert sum(math.prod(s) for s in backbone) == 22_050_664 - 385_000


def test_twelve_heads_of_32_channels(moco):
    """The attention of a block against softmax(q k^T / sqrt(32)) v over 12 heads of 32 channels, written out."""
    attn = moco.student["backbone"].blocks[0].attn
    x = torch.randn(2, 5, D)
    q, k, v = (attn.qkv(x).reshape(2, 5, 3, HEADS, D // HEADS)[:, :, j].transpose(1, 2) for j in range(3))
    heads = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1) @ v
    want = attn.proj(heads.transpose(1, 2).reshape(2, 5, D))
    assert torch.allclose(attn(x), want, atol=1e-5)


def test_position_embedding_is_moco_v3_fixed_sincos(moco):
    pos = moco.student["backbone"].pos_embed
    assert not pos.requires_grad
    assert torch.allclose(pos.double(), reference_sincos(GRID, GRID, D), atol=1e-5)
    assert torch.equal(moco.teacher["backbone"].pos_embed, pos)


def test_init_is_moco_v3_xavier():
    """vits.py: every Linear U(+-sqrt(6 / (fan_in + fan_out))), qkv's fan_out a third of its rows; the patch
    projection U(+-sqrt(6 / (3 * 16 * 16 + D))); zero biases."""
    torch.manual_seed(0)
    vit = build_backbone("vit_small", num_heads=12, pos_embed="sincos", freeze_patch_embed=True, init="xavier")
    blk = vit.blocks[0]
    bounds = {"qkv": (blk.attn.qkv, math.sqrt(6 / (D + D))), "proj": (blk.attn.proj, math.sqrt(6 / (D + D))),
              "fc1": (blk.mlp.fc1, math.sqrt(6 / (D + 4 * D))), "fc2": (blk.mlp.fc2, math.sqrt(6 / (4 * D + D))),
              "patch": (vit.patch_embed.proj, math.sqrt(6 / (3 * PATCH * PATCH + D)))}
    for name, (layer, bound) in bounds.items():
        top = layer.weight.abs().max().item()
        assert 0.99 * bound < top <= bound, name  # uniform: the largest of many draws is near the bound
        assert torch.count_nonzero(layer.bias) == 0, name


def test_one_step_leaves_the_patch_projection_and_position_embedding_and_decays_everything(recipe):
    torch.manual_seed(0)
    m = build_method(recipe).train()
    modules = m.student_modules()
    optimizer = build_optimizer(modules, recipe, torch.device("cpu"), m.no_decay)
    # AdamW decays every parameter it holds (decay_all), and holds every parameter but the frozen ones
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(g["wd_mult"] == 1.0 for g in optimizer.param_groups)
    named = {f"{k}.{n}": p for k, mod in modules.items() for n, p in mod.named_parameters()}
    assert {n for n, p in named.items() if id(p) not in held} == {
        "backbone.pos_embed", "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"}
    before = {n: p.detach().clone() for n, p in named.items()}
    set_schedule(optimizer, lr=1e-3, weight_decay=0.1)
    B = 4  # 64 px views: the 14 x 14 sin-cos table is resized to 4 x 4
    batch = Batch(torch.randn(2 * B, 3, 64, 64), None, None, torch.zeros(B), 2, 0)
    out = m(batch, Schedules.build(recipe, m.schedules(), 10, 10).progress(0))
    out["loss"].backward()
    optimizer.step()
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed == set(named) - {"backbone.pos_embed", "backbone.patch_embed.proj.weight",
                                    "backbone.patch_embed.proj.bias", "backbone.mask_token"}
    assert named["backbone.mask_token"].grad is None  # MoCo never masks


def test_predictor_after_a_resnet_ends_without_bn_and_without_bias():
    """builder.py MoCo_ResNet: predictor _build_mlp(2, dim, mlp_dim, dim, False); v2 keeps its biases."""
    heads = {"hidden_dim": 32, "out_dim": 16, "pred_hidden_dim": 32, "n_layers": 2}
    cfg = tiny_config("moco", crops={"n_local": 0}, moco=heads, backbone={"arch": "resnet18", "cifar_stem": True})
    mlp = build_method(cfg).student["predictor"].mlp
    assert isinstance(mlp[-1], torch.nn.Linear) and mlp[-1].bias is None
    assert [type(layer).__name__ for layer in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_sincos_resizes_to_other_sizes_and_a_frozen_model_trains_from_the_cli(tmp_path):
    vit = build_backbone("vit_tiny", patch_size=4, depth=1, img_size=16, pos_embed="sincos", freeze_patch_embed=True)
    assert vit(torch.randn(2, 3, 24, 20)).shape == (2, 192)
    run = tmp_path / "run"
    assert main(["train", "--config", "moco_imagenet", "--data", "mnist5k", "--batch-size", "8", "--steps", "2",
                 "--out", str(run), "backbone.depth=1", "backbone.patch_size=4", "backbone.img_size=16",
                 "crops.global_size=16", "moco.hidden_dim=64", "moco.out_dim=32", "moco.pred_hidden_dim=64",
                 "data.num_workers=0", "train.threads=1", "train.device=cpu", "eval.final=false"]) == 0
    assert sorted(losses(run)) == [1, 2] and all(math.isfinite(x) for x in losses(run).values())
    exported = load(run)  # the export rebuilds MoCo v3's ViT from its saved config
    assert exported.backbone.blocks[0].attn.num_heads == 12 and not exported.backbone.pos_embed.requires_grad
    assert torch.allclose(exported.backbone.pos_embed.double(), reference_sincos(4, 4, D), atol=1e-5)
