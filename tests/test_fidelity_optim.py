"""Optimisation around the losses, each against its reference restated plainly: gradient clipping (dino and ibot
utils.clip_gradients; dinov2 train/ssl_meta_arch.py, one clip_grad_norm_ per student module), weight decay
exemptions (dino utils.get_params_groups; dinov2 utils/param_groups.py), DINOv2's fixed-length epoch (train/train.py
OFFICIAL_EPOCH_LENGTH) and bicubic resizing (main_dino.py, dinov2 data/augmentations.py and transforms.py)."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.config import Config, apply, load_recipe
from selfsup.data.views import eval_geometry, eval_transform, resized_crop
from selfsup.methods import build_method, method_class
from selfsup.training.optim import build_optimizer, clip_gradients
from selfsup.training.schedules import Schedules, run_length
from tiny import tiny_config

IBOT_HEADS = {"head_n_prototypes": 128, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "separate_head": True}


def with_random_grads(method, seed: int = 0) -> dict[str, torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    modules = method.student_modules()
    for m in modules.values():
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g) * float(torch.rand(1, generator=g)) * 10
    return modules


def grads(modules) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": p.grad.clone() for k, m in modules.items() for n, p in m.named_parameters() if p.grad is not None}


def dino_clip_gradients(grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """utils.clip_gradients as DINO and iBOT write it: each parameter's gradient on its own."""
    out = {}
    for name, g in grads.items():
        clip_coef = clip / (g.norm(2).item() + 1e-6)
        out[name] = g * clip_coef if clip_coef < 1 else g
    return out


def module_clip(grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """torch's clip_grad_norm_ once per student module (the name's first part), as DINOv2 calls it."""
    out = {}
    for module in {n.split(".")[0] for n in grads}:
        names = [n for n in grads if n.split(".")[0] == module]
        total = torch.linalg.vector_norm(torch.stack([grads[n].norm(2) for n in names]))
        coef = min(clip / (total.item() + 1e-6), 1.0)
        out.update({n: grads[n] * coef for n in names})
    return out


@pytest.mark.parametrize("method,mode,ref", [("dino", "param", dino_clip_gradients), ("ibot", "param", dino_clip_gradients),
                                             ("dinov2", "module", module_clip)])
def test_each_method_clips_as_its_reference_tensor_by_tensor(method, mode, ref):
    m = build_method(tiny_config(method, ibot=IBOT_HEADS))
    assert m.clip_mode == mode
    modules = with_random_grads(m)
    before = grads(modules)
    clip_gradients(modules, 3.0, m.clip_mode)
    expected = ref(before, 3.0)
    after = grads(modules)
    assert sum(not torch.equal(before[n], expected[n]) for n in before) > 5  # the clip did act
    for n in before:
        torch.testing.assert_close(after[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_distillation_follows_dinov2():
    from selfsup.methods.distill import Distill

    assert (Distill.clip_mode, Distill.no_decay) == ("module", "names")


def test_global_clip_is_one_norm_over_everything_and_differs_from_per_tensor():
    m = build_method(tiny_config("dino"))
    modules = with_random_grads(m)
    before = grads(modules)
    clip_gradients(modules, 3.0, "global")
    total = torch.linalg.vector_norm(torch.stack([g.norm(2) for g in before.values()])).item()
    for n, g in grads(modules).items():
        torch.testing.assert_close(g, before[n] * min(3.0 / (total + 1e-6), 1.0))
    per_tensor = dino_clip_gradients(before, 3.0)
    assert any(not torch.allclose(g, per_tensor[n]) for n, g in grads(modules).items())


def decay_multipliers(method: str, **extra) -> dict[str, float]:
    cfg = tiny_config(method, ibot=IBOT_HEADS, backbone={"layerscale": 1e-5, "n_registers": 2}, **extra)
    m = build_method(cfg)
    modules = m.student_modules()
    opt = build_optimizer(modules, cfg, torch.device("cpu"), m.no_decay)
    by_id = {id(p): g["wd_mult"] for g in opt.param_groups for p in g["params"]}
    return {f"{k}.{n}": by_id[id(p)] for k, mod in modules.items() for n, p in mod.named_parameters() if p.requires_grad}


def test_dino_and_ibot_exempt_only_biases_and_1d_tensors():
    for method in ("dino", "ibot"):
        mults = decay_multipliers(method)
        params = {f"{k}.{n}": p for k, mod in build_method(tiny_config(method, ibot=IBOT_HEADS, backbone={
            "layerscale": 1e-5, "n_registers": 2})).student_modules().items() for n, p in mod.named_parameters()}
        for name, mult in mults.items():  # dino utils.get_params_groups
            assert mult == (0.0 if name.endswith(".bias") or params[name].ndim == 1 else 1.0), name
        assert mults["backbone.cls_token"] == mults["backbone.pos_embed"] == mults["backbone.mask_token"] == 1.0


def test_dinov2_exempts_bias_norm_and_gamma_by_name():
    mults = decay_multipliers("dinov2")
    for name, mult in mults.items():  # dinov2 utils/param_groups.py get_params_groups_with_decay
        assert mult == (0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0), name
    assert mults["backbone.register_tokens"] == mults["backbone.cls_token"] == 1.0
    assert mults["backbone.blocks.0.ls1.gamma"] == 0.0


def test_decay_all_decays_everything():
    assert set(decay_multipliers("dino", optim={"steps": 5, "batch_size": 8, "warmup_epochs": 0.0,
                                               "decay_all": True}).values()) == {1.0}


@pytest.mark.parametrize("recipe", ["dinov2_imagenet", "distill_imagenet", "dinov2_vits8"])
def test_dinov2_recipes_schedule_milestones_in_official_epochs(recipe):
    cfg = Config()
    load_recipe(cfg, recipe)
    per_pass = 1_281_167 // cfg.optim.batch_size  # ImageNet-1k: 625 steps a pass at batch 2048, 1251 at 1024
    total, epoch = run_length(cfg.optim, per_pass)
    assert (total, epoch) == (100 * 1250, 1250)
    small = copy.deepcopy(cfg)  # the recipe's schedules on a small model
    apply(small, {"backbone": {"arch": "vit_tiny", "depth": 1, "n_registers": 0},
                  "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
                  "ibot": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16}}, "test")
    # distill's frozen teacher comes from a run folder (Distill.inputs): its schedules do not depend on it
    method = method_class(small.method)(small, teacher=torch.nn.ModuleDict()) if small.method == "distill" \
        else build_method(small)
    s = Schedules.build(cfg, method.schedules(), total, epoch)
    teacher_temp, frozen, momentum = (s.method[k] for k in ("teacher_temp", "freeze_last_layer", "momentum"))
    warmup = 10 * 1250  # the reference: lr warm-up 10 epochs, teacher temp 30, last layer frozen 1, of 1250 its
    assert int(np.argmax(s.lr)) == warmup and s.lr[warmup - 1] < s.lr[warmup]
    assert teacher_temp[30 * 1250 - 1] < 0.07 and teacher_temp[30 * 1250] == pytest.approx(0.07)
    assert frozen.sum() == 1250 and frozen[1249] == 1 and s.first_full_step == 1250
    assert momentum[-1] == pytest.approx(1.0) and len(s.lr) == 125_000
    # the high-resolution stage (DINOv2 Sec. 4): the last 10,000 steps at 512 px, from step 115,000, as the
    # trainer places it (Trainer.schedule: highres.steps scaled like the epochs, here by 1)
    if recipe == "distill_imagenet":
        assert cfg.highres.steps == 0
    else:
        assert (cfg.highres.steps, cfg.highres.global_size, s.epoch_scale) == (10_000, 512, 1.0)
        assert total - max(1, round(cfg.highres.steps * s.epoch_scale)) == 115_000
    cfg.optim.epoch_length = None  # without it an epoch is a pass: fewer steps than the reference's
    assert run_length(cfg.optim, per_pass) == (100 * per_pass, per_pass)


@pytest.mark.parametrize("size", [96, 224, 600])
def test_resized_crops_are_pil_bicubic(size):
    from skimage import data

    img = data.astronaut()
    ours = resized_crop(torch.from_numpy(img).permute(2, 0, 1).contiguous(), (10, 20, 400, 380), size, False)
    ours = ours.permute(1, 2, 0).numpy().astype(int)
    crop = Image.fromarray(img).crop((20, 10, 400, 410))
    bicubic = abs(ours - np.asarray(crop.resize((size, size), Image.BICUBIC)).astype(int))
    bilinear = abs(ours - np.asarray(crop.resize((size, size), Image.BILINEAR)).astype(int))
    assert bicubic.mean() < 0.3 and bicubic.max() <= 6  # torch's antialiased bicubic is PIL's up to rounding
    assert bilinear.mean() > 0.9


def reference_eval_view(img: np.ndarray, size: int = 224) -> np.ndarray:
    """torchvision's Resize(256, BICUBIC) + CenterCrop(224) on a PIL image (DINO eval_linear.py, DINOv2
    data/transforms.py), restated: the shorter side to 256, the longer int(256 * long / short); no resize at that
    size already; crop offsets int(round(d / 2.0))."""
    h, w = img.shape[:2]
    short = size * 256 // 224
    nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    pil = Image.fromarray(img)
    if (nh, nw) != (h, w):
        pil = pil.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.asarray(pil.crop((left, top, left + size, top + size)))


# 250 x 335: an odd margin (343 - 224 = 119), rounded to 60 where floor gives 59
@pytest.mark.parametrize("shape", [(250, 333), (300, 301), (224, 224), (100, 80), (500, 669), (250, 335)])
def test_evaluation_view_is_torchvision_resize_256_center_crop_224(shape):
    from skimage import data

    h, w = shape
    img = np.array(Image.fromarray(data.astronaut()).resize((w, h), Image.BILINEAR))
    want = reference_eval_view(img)
    nh, nw, top, left = eval_geometry(h, w, 224)
    assert min(nh, nw) == 256 and max(nh, nw) == int(256 * max(h, w) / min(h, w))
    assert (top, left) == (int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0)))
    ours = eval_transform(torch.from_numpy(img).permute(2, 0, 1).contiguous(), 224, (0.0,) * 3, (1.0,) * 3)
    diff = abs(ours.permute(1, 2, 0).numpy() * 255 - want.astype(float))
    assert diff.mean() < 0.3 and diff.max() <= 4  # PIL rounds to uint8 (a mean of 0.25 levels); up- or downscaled
    shifted = np.roll(want.astype(float), 1, axis=int(np.argmax(shape)))  # one pixel off along the long side
    assert abs(ours.permute(1, 2, 0).numpy() * 255 - shifted).mean() > 2 * diff.mean()
