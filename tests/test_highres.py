"""DINOv2's high-resolution stage (Sec. 4): the last highres.steps steps on larger crops, with the position
embeddings interpolated to the new grid; checkpoints inside the stage resume bit-identically."""
from __future__ import annotations

import shutil

import pytest
import torch

from selfsup.cli import main
from selfsup.config import highres_crops
from selfsup.training.checkpoint import latest
from selfsup.training.trainer import HIGHRES_EPOCH, Trainer
from tiny import ARGS, losses, tiny_config

STAGE = ["highres.steps=3", "highres.global_size=24"]
# a run of 6 steps over digits' 179 batches of 8 is 6/179 epochs: schedule_epochs equal to it keeps highres.steps
RUN = ["train", "--steps", "6", *ARGS, *STAGE, f"optim.schedule_epochs={6 / 179}", "train.checkpoint_every=1",
       "train.keep_last=2"]
# the method the stage is for: DINOv2's batch masks drawn at the new grid, KoLeo, uniform drop path (the kept subset)
DINOV2 = ["ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
          "ibot.separate_head=true", "ibot.masking=dinov2", "dinov2.koleo_loss_weight=0.1", "backbone.drop_path=0.3",
          "backbone.drop_path_uniform=true"]


def test_local_crops_grow_like_the_global_ones_to_a_multiple_of_the_patch():
    cfg = tiny_config(highres={"steps": 3, "global_size": 24})
    assert (highres_crops(cfg).global_size, highres_crops(cfg).local_size) == (24, 12)  # 8 x 24 / 16
    cfg = tiny_config(highres={"steps": 3, "global_size": 40})
    assert highres_crops(cfg).local_size == 20  # 8 x 40 / 16 = 20, a multiple of the patch 4
    cfg = tiny_config(highres={"steps": 3, "global_size": 40, "local_size": 16})
    assert highres_crops(cfg).local_size == 16
    assert highres_crops(tiny_config()) is None


def test_the_last_steps_take_the_large_crops_with_interpolated_position_embeddings(tmp_path):
    cfg = tiny_config("dinov2", steps=6, highres={"steps": 3, "global_size": 24, "batch_size": 4},
                      ibot={"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                            "separate_head": True, "masking": "dinov2"},
                      optim={"steps": 6, "batch_size": 8, "warmup_epochs": 0.0, "schedule_epochs": 6 / 179})
    t = Trainer(cfg, tmp_path / "run")
    assert (t.highres_start, t.batch_size(2), t.batch_size(3)) == (3, 8, 4)
    t.step = 2
    batches, epoch, start, end = t.position()
    assert (batches is t.batches, epoch, start, end) == (True, 0, 2, 3)
    t.step = 3
    batches, epoch, start, end = t.position()
    assert (batches is t.highres_batches, epoch, start, end) == (True, HIGHRES_EPOCH, 0, 6)
    batches.set_epoch(epoch)
    views = batches[0]
    assert views.global_crops.images.shape == (2 * 4, 3, 24, 24)
    assert views.local_crops.images.shape == (2 * 4, 3, 12, 12)
    assert views.masks.shape == (2 * 4, 6, 6) and views.masks.any()  # DINOv2's masks on the 6 x 6 grid
    vit = t.method.student["backbone"]
    grid = vit.pos_embed.shape[1] - 1
    assert grid == 16  # built for 16 px crops: 4 x 4 patches
    pos = vit.interpolate_pos_encoding(24, 24)  # and interpolated to the stage's 6 x 6
    assert pos.shape == (1, 37, vit.pos_embed.shape[-1])
    assert torch.equal(pos[:, 0], vit.pos_embed[:, 0])  # the [CLS] position is kept
    m = t.train_step(views)
    assert m is not None and torch.isfinite(torch.tensor(m["loss"]))


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_a_run_resumed_inside_the_stage_repeats_its_losses(tmp_path, method):
    run_args = [RUN[0], "--method", method, *RUN[1:], *(DINOV2 if method == "dinov2" else [])]
    assert main([*run_args, "--out", str(tmp_path / "ref")]) == 0
    kept = sorted(p.name for p in (tmp_path / "ref").glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000003.pt", "checkpoint-00000005.pt", "checkpoint-00000006.pt"]  # + the stage's start
    ref = losses(tmp_path / "ref")
    assert ('"koleo"' in (tmp_path / "ref" / "metrics.jsonl").read_text()) == (method == "dinov2")
    log = (tmp_path / "ref" / "train.log").read_text()
    assert "step 3: high-resolution stage, 3 steps of 2 x 24 + 2 x 12 px crops, batch 8" in log
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", run)
    for name in ("checkpoint-00000006.pt", "backbone.safetensors"):
        (run / name).unlink()
    assert latest(run).name == "checkpoint-00000005.pt"  # inside the stage
    assert main([*run_args, "--out", str(run), "--resume"]) == 0
    got = losses(run)
    assert list(got) == list(range(1, 7))
    assert got == ref  # bit-identical: the same crops, masks and drop paths as the uninterrupted run


def test_the_stage_without_a_size_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--steps", "2", *ARGS, "highres.steps=3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "highres.steps" in err[0] and "highres.global_size" in err[0]
    assert not (tmp_path / "r").exists()
