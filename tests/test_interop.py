"""Hugging Face, timm and ONNX, both ways where there are two: the [CLS] and patch outputs agree.

transformers and onnxruntime run here; timm does not install (it needs torchvision), so timm's side is its key
layout and `timm_forward`, a restatement of timm's VisionTransformer.forward_features (models/vision_transformer.py
`_pos_embed`, `Block`; layers/mlp.py `Mlp`, `GluMlp` as `SwiGLUPacked`) from the raw tensors."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import selfsup
from selfsup.cli import main
from selfsup.config import BackboneConfig
from selfsup.convert import export
from selfsup.errors import UserError
from selfsup.nn import backbone_from_config
from selfsup.weights import Loaded

transformers = pytest.importorskip("transformers")

D, HEADS, PATCH, SIZE = 192, 3, 8, 32  # vit_tiny's width, a 4 x 4 grid
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
MEAN4, STD4 = (0.5, 0.4, 0.3, 0.2), (0.2, 0.25, 0.3, 0.35)  # a 4-channel model's


def randomise(named, std_of) -> None:
    """Every tensor drawn at random (norm weights around 1), so that no key can be mapped to the wrong place
    unnoticed."""
    with torch.no_grad():
        for name, p in named:
            base = 1.0 if name.endswith("norm.weight") or re.search(r"norm\d?\.weight$", name) else 0.0
            p.copy_(base + torch.randn_like(p) * std_of(name))



def token_std(name: str) -> float:
    tokens = ("cls_token", "pos_embed", "position_embeddings", "register_tokens", "reg_token", "mask_token")
    return 1.0 if name.endswith(tokens) else 0.5 if name.endswith(("gamma", "lambda1")) else 0.1


def selfsup_vit(**options) -> Loaded:
    cfg = BackboneConfig(arch="vit_tiny", patch_size=PATCH, depth=2, img_size=SIZE, drop_path=0.0, **options)
    torch.manual_seed(0)
    backbone = backbone_from_config(cfg).eval()
    randomise(backbone.named_parameters(), token_std)
    four = cfg.in_chans == 4
    return Loaded(backbone, cfg, SIZE, MEAN4 if four else MEAN, STD4 if four else STD, "test")


def ours(loaded: Loaded, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = loaded.backbone.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def close(a, b, tol=1e-5) -> None:
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


# ---------------------------------------------------------------- Hugging Face


def hf_model(registers: int = 0, swiglu: bool = False, channels: int = 3, classifier: bool = False):
    """A random transformers DINOv2 (with registers), or its image classifier (5 labels)."""
    kw = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
              use_swiglu_ffn=swiglu, layerscale_value=1e-5, num_channels=channels, num_labels=5)
    kind = "Dinov2WithRegisters" if registers else "Dinov2"
    config = getattr(transformers, f"{kind}Config")(**kw, **({"num_register_tokens": registers} if registers else {}))
    model = getattr(transformers, f"{kind}{'ForImageClassification' if classifier else 'Model'}")(config)
    torch.manual_seed(1)
    randomise(model.named_parameters(), token_std)
    return model.eval()


def hf_outputs(model, x, registers: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state  # after the final layernorm
    return tokens[:, 0], tokens[:, 1 + registers:]


@pytest.mark.parametrize("registers,swiglu,layout", [(0, False, "saved"), (4, True, "saved"), (4, True, "modules")])
def test_a_transformers_folder_loads_and_gives_its_outputs(tmp_path, registers, swiglu, layout):
    model = hf_model(registers, swiglu)
    model.save_pretrained(tmp_path)
    if layout == "modules":  # transformers 5's own module names (q_proj, gate_proj, ...), as a state_dict holds them
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
        assert "encoder.layer.0.attention.q_proj.weight" in load_file(str(tmp_path / "model.safetensors"))
    loaded = selfsup.load(tmp_path)
    c = loaded.config
    assert (c.arch, c.depth, c.patch_size, c.img_size, c.n_registers, c.ffn) == (
        "vit_tiny", 2, PATCH, SIZE, registers, "swiglu" if swiglu else "mlp")
    assert (c.interpolate_offset, c.interpolate_antialias) == (0.0, registers > 0)  # as transformers resizes
    assert (loaded.image_size, loaded.mean) == (SIZE, (0.485, 0.456, 0.406))  # no preprocessor_config.json
    torch.manual_seed(2)
    for shape in [(2, 3, SIZE, SIZE), (1, 3, 48, 48), (1, 3, 40, 56)]:  # native, then resized position embeddings
        x = torch.randn(shape)
        close(ours(loaded, x), hf_outputs(model, x, registers))


@pytest.mark.parametrize("options,cls", [
    (dict(n_registers=4, ffn="swiglu", layerscale=1e-5, interpolate_offset=0.0, interpolate_antialias=True),
     "Dinov2WithRegistersModel"),
    (dict(layerscale=None, qkv_bias=False), "Dinov2Model"),  # offset 0.1: resizes unlike transformers
])
def test_export_hf_gives_a_folder_automodel_loads_with_the_same_outputs(tmp_path, options, cls):
    loaded = selfsup_vit(**options)
    export(loaded, "hf", tmp_path / "hf")
    model, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == cls
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    registers = options.get("n_registers", 0)
    torch.manual_seed(3)
    shapes = [(2, 3, SIZE, SIZE), (1, 3, 48, 48)] if registers else [(2, 3, SIZE, SIZE)]
    for shape in shapes:
        x = torch.randn(shape)
        close(hf_outputs(model.eval(), x, registers), ours(loaded, x))
    # back: the preprocessor config keeps the size and normalisation; the weights are the same
    back = selfsup.load(tmp_path / "hf")
    assert (back.image_size, back.mean, back.std) == (SIZE, MEAN, STD)
    x = torch.randn(2, 3, SIZE, SIZE)
    close(ours(back, x), ours(loaded, x))


def test_a_4_channel_vit_goes_to_transformers_and_back(tmp_path):
    loaded = selfsup_vit(in_chans=4)
    export(loaded, "hf", tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_channels == 4 and model.embeddings.patch_embeddings.projection.in_channels == 4
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert (pre["image_mean"], pre["image_std"], pre["do_convert_rgb"]) == (list(MEAN4), list(STD4), False)
    torch.manual_seed(6)
    x = torch.randn(2, 4, SIZE, SIZE)
    close(hf_outputs(model, x, 0), ours(loaded, x))
    back = selfsup.load(tmp_path / "hf")
    assert (back.config.in_chans, back.mean, back.std) == (4, MEAN4, STD4)
    close(ours(back, x), ours(loaded, x))
    pre["image_mean"] = list(MEAN)  # statistics of another channel count: named
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(UserError, match=re.escape("image_mean [0.5, 0.4, 0.3] and image_std [0.2, 0.25, 0.3, 0.35] "
                                                  "for num_channels=4 (expected 4 numbers each)")):
        selfsup.load(tmp_path / "hf")


def test_a_4_channel_transformers_folder_loads_with_gray_imagenet_statistics(tmp_path):
    model = hf_model(channels=4)
    model.save_pretrained(tmp_path)
    loaded = selfsup.load(tmp_path)
    assert loaded.config.in_chans == 4 and loaded.backbone.patch_embed.proj.weight.shape[1] == 4
    # no preprocessor_config.json: ImageNet's statistics averaged over R, G, B, on every channel
    assert loaded.mean == pytest.approx((0.449,) * 4) and loaded.std == pytest.approx((0.226,) * 4)
    torch.manual_seed(7)
    for shape in [(2, 4, SIZE, SIZE), (1, 4, 48, 48)]:
        x = torch.randn(shape)
        close(ours(loaded, x), hf_outputs(model, x, 0))


@pytest.mark.parametrize("registers", [0, 4])
def test_an_image_classifier_folder_loads_as_its_backbone(tmp_path, registers):
    model = hf_model(registers, classifier=True)
    model.save_pretrained(tmp_path)
    prefix = "dinov2_with_registers." if registers else "dinov2."
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert {"classifier.weight", "classifier.bias", f"{prefix}embeddings.cls_token"} <= keys
    loaded = selfsup.load(tmp_path)
    assert (loaded.config.n_registers, type(model).__name__) == (
        registers, f"Dinov2{'WithRegisters' if registers else ''}ForImageClassification")
    assert not any("classifier" in k for k in loaded.backbone.state_dict())
    torch.manual_seed(8)
    x = torch.randn(2, 3, SIZE, SIZE)
    close(ours(loaded, x), hf_outputs(model.base_model, x, registers))


def test_hf_round_trip_keeps_every_tensor(tmp_path):
    model = hf_model(registers=4, swiglu=True)
    model.save_pretrained(tmp_path / "a")
    export(tmp_path / "a", "hf", tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- timm


def timm_keys(depth: int, registers: int) -> set[str]:
    """The tensors of timm's VisionTransformer(class_token, reg_tokens, init_values, num_classes=0)."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    keys |= {"reg_token"} if registers else set()
    for i in range(depth):
        keys |= {f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def timm_forward(sd: dict, x: torch.Tensor, no_embed_class: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's forward_features, restated: prefix tokens [CLS, registers]; with no_embed_class the position
    embedding is added to the patches before they join the prefix, else to all tokens after; pre-norm blocks
    with layer scale; SwiGLUPacked: silu of fc1's first half times its second half."""
    b = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2).mT
    prefix = [sd[k].expand(b, -1, -1) for k in ("cls_token", "reg_token") if k in sd]
    if no_embed_class:
        t = torch.cat(prefix + [t + sd["pos_embed"]], 1)
    else:
        t = torch.cat(prefix + [t], 1) + sd["pos_embed"]
    n, hd = t.shape[1], D // HEADS
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias"))
        q, k, v = qkv.reshape(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        a = (((q @ k.mT) * hd ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(b, n, D)
        t = t + p("ls1.gamma") * F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.linear(F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6), p("mlp.fc1.weight"),
                     p("mlp.fc1.bias"))
        if y.shape[-1] == 2 * p("mlp.fc2.weight").shape[1]:  # GluMlp(gate_last=False)
            x1, x2 = y.chunk(2, -1)
            y = F.silu(x1) * x2
        else:
            y = F.gelu(y)
        t = t + p("ls2.gamma") * F.linear(y, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 0], t[:, sum(p.shape[1] for p in prefix):]


def timm_state(registers: int, swiglu: bool) -> dict[str, torch.Tensor]:
    """A random state dict as timm's vit_*_dinov2 hold them (reg4: no_embed_class, so no class position)."""
    torch.manual_seed(4)
    grid = (SIZE // PATCH) ** 2
    hidden = 2 * ((int(4 * D * 2 / 3) + 7) // 8 * 8) if swiglu else 4 * D  # SwiGLUPacked: both halves in fc1
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, grid + (0 if registers else 1), D),
              "reg_token": (1, registers, D), "patch_embed.proj.weight": (D, 3, PATCH, PATCH)}
    fc2_in = hidden // 2 if swiglu else hidden
    block = {"attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D),
             "mlp.fc1.weight": (hidden, D), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (D, fc2_in)}
    sd = {}
    for k in timm_keys(2, registers):
        short = k.split(".", 2)[-1] if k.startswith("blocks.") else k
        sd[k] = torch.randn(shapes.get(short) or block.get(short) or (D,)) * token_std(k)
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            sd[k] += 1
    return sd


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (4, True)])
def test_a_timm_state_dict_loads_and_gives_timms_outputs(tmp_path, registers, swiglu):
    sd = timm_state(registers, swiglu)
    torch.save(sd, tmp_path / "timm.pth")
    loaded = selfsup.load(tmp_path / "timm.pth")
    c = loaded.config
    assert (c.n_registers, c.ffn, c.img_size) == (registers, "swiglu" if swiglu else "mlp", SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    close(ours(loaded, x), timm_forward(sd, x, no_embed_class=registers > 0), tol=1e-4)
    # and back: the same tensors under the same names; the model arguments in the metadata
    export(loaded, "timm", tmp_path / "back.safetensors")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        kwargs = json.loads(f.metadata()["timm"])
    assert (kwargs["reg_tokens"], kwargs["no_embed_class"], kwargs["img_size"]) == (registers, registers > 0, SIZE)
    assert int(D * kwargs["mlp_ratio"]) == sd["blocks.0.mlp.fc1.weight"].shape[0]  # timm's hidden width


@pytest.mark.parametrize("options", [dict(n_registers=4, ffn="swiglu", layerscale=1e-5), dict(qkv_bias=False)])
def test_export_timm_has_timms_layout_and_outputs(tmp_path, options):
    loaded = selfsup_vit(**options)
    export(loaded, "timm", tmp_path / "timm.pth")
    sd = torch.load(tmp_path / "timm.pth")
    registers = options.get("n_registers", 0)
    assert sd.keys() == timm_keys(2, registers)
    assert sd["pos_embed"].shape[1] == (SIZE // PATCH) ** 2 + (0 if registers else 1)
    x = torch.randn(2, 3, SIZE, SIZE)
    close(timm_forward(sd, x, no_embed_class=registers > 0), ours(loaded, x), tol=1e-4)


def test_a_4_channel_vit_exports_to_timm_with_in_chans_and_reads_back(tmp_path, caplog):
    loaded = selfsup_vit(in_chans=4)
    with caplog.at_level("INFO", logger="selfsup"):
        export(loaded, "timm", tmp_path / "timm.safetensors")
    assert "'in_chans': 4" in caplog.text  # the model arguments printed
    with safe_open(str(tmp_path / "timm.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["timm"])["in_chans"] == 4
    sd = load_file(str(tmp_path / "timm.safetensors"))
    assert sd["patch_embed.proj.weight"].shape == (D, 4, PATCH, PATCH)
    x = torch.randn(2, 4, SIZE, SIZE)
    close(timm_forward(sd, x, no_embed_class=False), ours(loaded, x), tol=1e-4)
    back = selfsup.load(tmp_path / "timm.safetensors")  # the channel count read off the patch embedding
    assert back.config.in_chans == 4 and back.mean == pytest.approx((0.449,) * 4)
    close(ours(back, x), ours(loaded, x))


# ---------------------------------------------------------------- ONNX and safetensors


def test_onnx_matches_torch_with_dynamic_batch_and_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    loaded = selfsup_vit()  # DINO's resize: bicubic by (n + 0.1) / M
    loaded.save(tmp_path / "b.safetensors")
    assert main(["export", str(tmp_path / "b.safetensors"), "--format", "onnx", "--out", str(tmp_path / "b.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "b.onnx"))
    torch.manual_seed(5)
    for shape in [(2, 3, SIZE, SIZE), (3, 3, SIZE, SIZE), (1, 3, 48, 48), (2, 3, 40, 56), (1, 3, 16, 16)]:
        x = torch.randn(shape)
        got = session.run(None, {"pixel_values": x.numpy()})
        close([torch.from_numpy(g) for g in got], ours(loaded, x), tol=1e-4)


def test_onnx_of_a_4_channel_vit_takes_4_channels(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    loaded = selfsup_vit(in_chans=4)
    export(loaded, "onnx", tmp_path / "b.onnx")
    session = ort.InferenceSession(str(tmp_path / "b.onnx"))
    assert session.get_inputs()[0].shape[1] == 4
    torch.manual_seed(9)
    for shape in [(2, 4, SIZE, SIZE), (1, 4, 40, 56)]:
        x = torch.randn(shape)
        got = session.run(None, {"pixel_values": x.numpy()})
        close([torch.from_numpy(g) for g in got], ours(loaded, x), tol=1e-4)


def test_onnx_of_an_antialiased_vit_has_a_fixed_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    loaded = selfsup_vit(n_registers=4, interpolate_offset=0.0, interpolate_antialias=True)
    loaded.image_size = 24  # evaluated below the native 32 px: a resampled position embedding
    export(loaded, "onnx", tmp_path / "b.onnx")
    session = ort.InferenceSession(str(tmp_path / "b.onnx"))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 24, 24)
        got = session.run(None, {"pixel_values": x.numpy()})
        close([torch.from_numpy(g) for g in got], ours(loaded, x), tol=1e-4)
    with pytest.raises(Exception, match="pixel_values"):
        session.run(None, {"pixel_values": torch.randn(1, 3, 32, 32).numpy()})


def test_export_safetensors_is_selfsups_own(tmp_path):
    loaded = selfsup_vit(n_registers=2)
    export(loaded, "safetensors", tmp_path / "b.safetensors")
    x = torch.randn(1, 3, SIZE, SIZE)
    assert all(torch.equal(a, b) for a, b in zip(ours(selfsup.load(tmp_path / "b.safetensors"), x), ours(loaded, x)))


# ---------------------------------------------------------------- errors


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    selfsup_vit().save(tmp_path / "b.safetensors")
    b = str(tmp_path / "b.safetensors")
    assert "--format tflite: expected one of safetensors, hf, timm, onnx" in one_line_error(
        capsys, ["export", b, "--format", "tflite", "--out", str(tmp_path / "x")])
    (tmp_path / "nocfg").mkdir()
    save_file({"embeddings.cls_token": torch.zeros(1, 1, D)}, str(tmp_path / "nocfg" / "model.safetensors"))
    assert "model.safetensors without config.json" in one_line_error(
        capsys, ["export", str(tmp_path / "nocfg"), "--format", "hf", "--out", str(tmp_path / "x")])
    cfg = BackboneConfig(arch="resnet18", cifar_stem=True)
    Loaded(backbone_from_config(cfg), cfg, 32, MEAN, STD, "t").save(tmp_path / "r.safetensors")
    assert "backbone.arch=resnet18 is not a ViT" in one_line_error(
        capsys, ["export", str(tmp_path / "r.safetensors"), "--format", "hf", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("change,message", [
    ({"model_type": "vit"}, "model_type 'vit' (expected dinov2 or dinov2_with_registers)"),
    ({"hidden_act": "relu"}, "hidden_act='relu' has no selfsup equivalent"),
    ({"hidden_size": 320, "num_attention_heads": 4}, "hidden_size=320 has no selfsup equivalent"),
])
def test_unsupported_transformers_configs_are_named(tmp_path, change, message):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape(message)):
        selfsup.load(tmp_path)


def test_missing_extras_are_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=re.escape("pip install 'selfsup[hf]'")):
        export(selfsup_vit(), "hf", tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError, match=re.escape("pip install 'selfsup[onnx]'")):
        export(selfsup_vit(), "onnx", tmp_path / "b.onnx")
