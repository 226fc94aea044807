"""Continued pretraining from a backbone without its heads (`--init-from`, InitConfig): the backbone is frozen in
student and teacher while the new heads learn, then trains with layer-wise lr decay after a warm-up; a resumed
run keeps those phases."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import ARGS, losses, tiny_config

from selfsup.cli import main
from selfsup.config import InitConfig
from selfsup.methods import build_method
from selfsup.training.checkpoint import load_checkpoint
from selfsup.training.optim import param_groups
from selfsup.training.schedules import continued

STEPS, FROZEN, RAMP = 7, 3, 2


def test_the_backbone_multiplier_is_zero_then_a_linear_ramp():
    got = continued(InitConfig(mode="backbone", head_warmup_steps=3, warmup_steps=4), 10)
    # restated: 3 frozen steps, then np.linspace(0, 1, 4), then 1
    assert got.tolist() == [0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1]
    assert continued(InitConfig(mode="method", head_warmup_steps=3), 5).tolist() == [1] * 5
    default = continued(InitConfig(mode="backbone"), 100)  # 10 % frozen, 5 % ramp
    assert (default[:11] == 0).all() and 0 < default[11] < default[13] < 1 and (default[14:] == 1).all()
    assert continued(InitConfig(mode="backbone", head_warmup_steps=50), 10).tolist() == [0] * 10


@pytest.mark.parametrize("recipe_decay, want", [(1.0, 0.9), (0.8, 0.8)])
def test_a_continued_backbone_takes_layerwise_lr_decay(recipe_decay, want):
    cfg = tiny_config(backbone={"depth": 2}, optim={"layerwise_decay": recipe_decay}, init={"mode": "backbone"})
    method = build_method(cfg)
    groups = param_groups(method.student_modules(), cfg)
    mult = {id(p): (g["lr_mult"], g["backbone"]) for g in groups for p in g["params"]}
    modules = method.student_modules()
    blocks = modules["backbone"].blocks
    for i, block in enumerate(blocks):  # DINOv2's decay^(L + 1 - layer_id), layer_id = i + 1
        assert mult[id(block.attn.qkv.weight)] == (pytest.approx(want ** (len(blocks) - i)), True)
    assert mult[id(modules["backbone"].cls_token)] == (pytest.approx(want ** (len(blocks) + 1)), True)
    head = next(modules["head"].parameters())
    assert mult[id(head)] == (1.0, False)


def run_args(out, *extra):
    return ["train", "--steps", str(STEPS), "--out", str(out), *ARGS, "train.checkpoint_every=1", "train.keep_last=20",
            *extra]


def state(run, step):
    return load_checkpoint(run / f"checkpoint-{step:08d}.pt")


def part(s, prefix):
    return {k[len(prefix):]: v for k, v in s["method_state"].items() if k.startswith(prefix)}


def test_fresh_heads_learn_on_the_frozen_backbone_then_it_trains(tmp_path):
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "base"), *ARGS]) == 0
    export = tmp_path / "base" / "backbone.safetensors"
    phases = [f"init.head_warmup_steps={FROZEN}", f"init.warmup_steps={RAMP}"]
    out = tmp_path / "continued"
    assert main([*run_args(out, *phases)[:1], "--init-from", str(export), *run_args(out, *phases)[1:]]) == 0
    pretrained = load_file(str(export))
    for step in range(1, FROZEN + 2):  # the frozen steps and the ramp's first (lr 0)
        s = state(out, step)
        for net in ("student.backbone.", "teacher.backbone."):
            assert all(torch.allclose(v, pretrained[k], atol=1e-6) for k, v in part(s, net).items()), (step, net)
    head = "student.head.mlp.0.weight"
    assert not torch.equal(state(out, 1)["method_state"][head], state(out, FROZEN)["method_state"][head])
    last = part(state(out, STEPS), "student.backbone.")
    assert not torch.allclose(last["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if "backbone_lr" in r]
    assert len(rows) == STEPS
    saved = (out / "config.yaml").read_text()
    assert "mode: backbone" in saved and str(export) in saved
    # resumed from step 2 (inside the frozen phase): the same losses as the uninterrupted run
    again = tmp_path / "again"
    again.mkdir()
    for f in ("config.yaml", "checkpoint-00000002.pt"):
        shutil.copy(out / f, again / f)
    assert main([*run_args(again, *phases), "--resume"]) == 0
    want, got = losses(out), losses(again)
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in range(3, STEPS + 1))


def test_a_whole_method_continues_without_a_frozen_phase(tmp_path):
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "base"), *ARGS]) == 0
    out = tmp_path / "more"
    assert main(["train", "--steps", "3", "--out", str(out), "--init-from", str(tmp_path / "base"), *ARGS]) == 0
    assert "mode: method" in (out / "config.yaml").read_text()
    assert np.all(continued(InitConfig(mode="method"), 3) == 1)
    # asking for the whole method from a bare backbone is one clear line
    assert main(["train", "--steps", "3", "--out", str(tmp_path / "bad"), "--init-from",
                 str(tmp_path / "base" / "backbone.safetensors"), *ARGS, "init.mode=method"]) == 2
