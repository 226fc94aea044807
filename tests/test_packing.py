"""Sequence packing: one forward over global and local crops gives what separate forwards give."""
import pytest
import torch

from selfsup.errors import UserError
from selfsup.nn.attention import Attention, Packing, set_attention_backend
from selfsup.nn.vit import vit

KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def crops():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randn(6, 3, 16, 16, generator=g)


def small_vit(**kw):
    torch.manual_seed(0)
    return vit("vit_tiny", patch_size=8, depth=2, img_size=32, n_registers=2, layerscale=0.1, **kw)


def both_ways(model, xs, masks):
    model.packing = True
    packed = model.forward_features_list(xs, masks)
    model.packing = False
    separate = model.forward_features_list(xs, masks)
    return packed, separate


@pytest.mark.parametrize("training", [False, True])
def test_packed_forward_equals_separate_forwards(training):
    model = small_vit(drop_path_rate=0.0).train(training)
    g, l = crops()
    masks = [torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.3, None]  # iBOT masks on globals
    packed, separate = both_ways(model, [g, l], masks)
    for p, s, n_tokens in zip(packed, separate, (16, 4)):
        assert p["x_norm_patchtokens"].shape == (len(s["x_prenorm"]), n_tokens, 192)
        for k in KEYS:
            torch.testing.assert_close(p[k], s[k], rtol=1e-5, atol=1e-5)
        assert p["masks"] is s["masks"]


def test_packed_gradients_equal_separate_gradients():
    model = small_vit(drop_path_rate=0.0)
    g, l = crops()
    grads = []
    for packing in (True, False):
        model.zero_grad()
        model.packing = packing
        outs = model.forward_features_list([g, l], [None, None])
        sum(o["x_norm_clstoken"].square().sum() + o["x_norm_patchtokens"].mean() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.1.attn.qkv.weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_pack_unpack_round_trip():
    xs = [torch.randn(3, 5, 8), torch.randn(2, 7, 8), torch.randn(4, 1, 8)]
    x, packing = Packing.pack(xs)
    assert x.shape == (3 * 5 + 2 * 7 + 4, 8) and packing.shapes == ((3, 5), (2, 7), (4, 1))
    for a, b in zip(packing.unpack(x), xs):
        assert torch.equal(a, b)


def test_packed_attention_is_block_diagonal():
    """Each sequence attends to itself only: changing one sequence changes no other's output."""
    torch.manual_seed(0)
    attn = Attention(16, 2)
    xs = [torch.randn(2, 5, 16), torch.randn(3, 3, 16)]
    x, packing = Packing.pack(xs)
    out = packing.unpack(attn(x, packing))
    for a, b in zip(out, xs):  # equal to attention over each group on its own
        torch.testing.assert_close(a, attn(b), rtol=1e-5, atol=1e-6)
    xs[1][0] += 1.0  # perturb sequence 0 of group 1
    out2 = packing.unpack(attn(*Packing.pack(xs)))
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[1][1:], out[1][1:])
    assert not torch.allclose(out2[1][0], out[1][0])


def test_dino_student_logits_packed_equal_separate():
    from selfsup.config import Config
    from selfsup.methods.base import Batch
    from selfsup.methods.dino import DINO

    cfg = Config()
    cfg.backbone.arch, cfg.backbone.patch_size, cfg.backbone.depth, cfg.backbone.img_size = "vit_tiny", 8, 1, 32
    cfg.backbone.drop_path = 0.0
    cfg.dino.out_dim, cfg.dino.hidden_dim, cfg.dino.bottleneck_dim = 64, 32, 16
    torch.manual_seed(0)
    method = DINO(cfg)
    g, l = crops()
    batch = Batch(g, l[:4], None, torch.zeros(2), n_global=2, n_local=2)
    logits = []
    for packing in (True, False):
        method.student["backbone"].packing = packing
        logits.append(method.student_logits(batch))
    assert len(logits[0]) == 4
    for a, b in zip(*logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def sdpa_kernels(model, x) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_attention_backend_switch_chooses_the_kernel():
    model = small_vit().eval()
    x = crops()[0]
    set_attention_backend(model, "flash")
    flash_kernels, flash_out = sdpa_kernels(model, x), model(x)
    set_attention_backend(model, "math")
    math_kernels, math_out = sdpa_kernels(model, x), model(x)
    assert any("flash" in k for k in flash_kernels) and not any("math" in k for k in flash_kernels)
    assert any("math" in k for k in math_kernels) and not any("flash" in k for k in math_kernels)
    torch.testing.assert_close(flash_out, math_out, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="unknown attention backend 'fast'"):
        set_attention_backend(model, "fast")
    with pytest.raises(UserError, match="no CPU kernel"):
        set_attention_backend(model, "efficient", torch.device("cpu"))


def test_trainer_sets_the_backend_of_training_and_evaluation(tmp_path):
    from selfsup.config import Config
    from selfsup.nn.attention import Attention
    from selfsup.training.trainer import Trainer

    cfg = Config()
    cfg.data.source, cfg.train.device, cfg.train.attention = "digits", "cpu", "math"
    cfg.backbone.arch, cfg.backbone.patch_size, cfg.backbone.depth, cfg.backbone.img_size = "vit_tiny", 4, 1, 8
    cfg.dino.out_dim, cfg.dino.hidden_dim, cfg.dino.bottleneck_dim = 64, 32, 16
    trainer = Trainer(cfg, tmp_path)
    layers = [m for m in trainer.method.modules() if isinstance(m, Attention)]
    evaluated = [m for m in trainer.method.backbone().modules() if isinstance(m, Attention)]
    assert len(layers) == 2 and evaluated and all(m.backend == "math" for m in layers)
