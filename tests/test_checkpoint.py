"""Checkpoints: atomic writes, the last K kept, unreadable ones passed over, non-finite steps skipped."""
from __future__ import annotations

import pytest
import torch

from selfsup.errors import UserError
from selfsup.training import checkpoint as ckpt
from selfsup.training.trainer import Trainer
from tiny import losses, tiny_config


def state(step: int) -> dict:
    return {"method_state": {"w": torch.full((3,), float(step))}, "config": {}, "step": step}


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-00000001.pt"
    ckpt.atomic_save(state(1), path)

    def dies_half_way(obj, f):
        f.write_bytes(b"PK\x03\x04 half a checkpoint")  # the temporary file atomic_write hands over
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(OSError):
        ckpt.atomic_save(state(2), path)
    assert torch.equal(ckpt.load_checkpoint(path)["method_state"]["w"], torch.full((3,), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_last_k_kept_and_a_killed_writers_temporary_removed(tmp_path):
    stale = tmp_path / ".checkpoint-00000003.pt.tmp-4242"  # what kill -9 during a write leaves
    stale.write_bytes(b"partial")
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000004.pt", "checkpoint-00000005.pt"]
    assert ckpt.latest(tmp_path).name == "checkpoint-00000005.pt"


def test_resume_passes_over_an_unreadable_checkpoint(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep_last=3)
    (tmp_path / "checkpoint-00000002.pt").write_bytes(b"cut short")
    path, found = ckpt.load_latest(tmp_path)
    assert path.name == "checkpoint-00000001.pt" and found["step"] == 1
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-00000002.pt")


def poison_from(trainer: Trainer, bad: set[int]) -> None:
    """Steps in `bad` see NaN images: the teacher's output, the loss and (unguarded) DINO's centre go NaN."""
    make = trainer.batch

    def batch(views):
        b = make(views)
        if trainer.step in bad:
            b.global_crops = torch.full_like(b.global_crops, float("nan"))
        return b

    trainer.batch = batch


def test_a_nan_step_is_skipped_counted_and_leaves_the_method_untouched(tmp_path):
    cfg = tiny_config(steps=6)
    ref = Trainer(cfg, tmp_path / "ref")
    ref.fit()
    run = Trainer(cfg, tmp_path / "run")
    poison_from(run, {2})
    result = run.fit()
    assert result["skipped_steps"] == 1 and result["steps"] == 6
    assert sorted(losses(tmp_path / "run")) == [1, 2, 4, 5, 6]
    assert torch.isfinite(run.method.center).all()
    # the skipped step changed nothing: the steps before it match a clean run, and every parameter is finite
    assert [losses(tmp_path / "run")[s] for s in (1, 2)] == [losses(tmp_path / "ref")[s] for s in (1, 2)]
    assert all(torch.isfinite(p).all() for p in run.method.parameters())


def test_k_bad_steps_in_a_row_stop_the_run_with_its_checkpoint_intact(tmp_path):
    cfg = tiny_config(steps=8, train={"checkpoint_every": 2, "max_bad_steps": 3})
    run = Trainer(cfg, tmp_path)
    poison_from(run, {3, 4, 5, 6, 7})
    with pytest.raises(UserError, match=r"3 non-finite losses in a row at step 6.*last checkpoint .* intact"):
        run.fit()
    path, found = ckpt.load_latest(tmp_path)
    assert path.name == "checkpoint-00000004.pt"  # step 4 was skipped: the checkpoint holds the state of step 3
    assert found["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in found["method_state"].values() if v.is_floating_point())


def test_short_epochs_are_checkpointed_and_logged_every_few_epochs(tmp_path, monkeypatch, caplog):
    import numpy as np
    from PIL import Image

    from selfsup.training import trainer
    for i in range(16):  # batch 8: two steps an epoch
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(trainer, "EPOCH_END_STEPS", 5)  # epoch ends at least 5 steps apart: every 3rd epoch
    cfg = tiny_config(steps=14, data={"source": str(tmp_path)}, train={"keep_last": 20})
    with caplog.at_level("INFO", logger="selfsup"):
        Trainer(cfg, tmp_path / "run").fit()
    assert [p.name for p in ckpt.checkpoints(tmp_path / "run")] == [
        "checkpoint-00000006.pt", "checkpoint-00000012.pt", "checkpoint-00000014.pt"]
    assert [r.getMessage() for r in caplog.records if "done" in r.getMessage()] == ["epoch 3/7 done", "epoch 6/7 done"]
