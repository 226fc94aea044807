"""A short DINO run: checkpoints round-trip bit-identically, and a resumed run repeats the losses of an
uninterrupted one."""
import json
import shutil

import torch

from selfsup.training.checkpoint import checkpoints, load_checkpoint
from selfsup.training.trainer import Trainer
from selfsup.weights import load, save_backbone

from conftest import tiny_config


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    Trainer(tiny_config(), full).fit()
    assert [p.name for p in checkpoints(full)] == ["checkpoint-00000003.pt", "checkpoint-00000006.pt"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "checkpoint-00000003.pt", resumed)  # as if killed after step 3
    Trainer(tiny_config(), resumed, resume=True).fit()
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    sa = load_checkpoint(full)["method_state"]
    sb = load_checkpoint(resumed)["method_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    t = Trainer(tiny_config(optim={"steps": 2}), tmp_path / "run")
    t.fit()
    state = load_checkpoint(tmp_path / "run")
    fresh = Trainer(tiny_config(optim={"steps": 2}), tmp_path / "other")
    fresh.load_state(state)
    ours, theirs = t.method.state_dict(), fresh.method.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert fresh.step == 2
    x = torch.randn(4, 3, 28, 28)
    save_backbone(t.method.backbone(), t.cfg, tmp_path / "run" / "backbone.safetensors")  # as `selfsup train` does
    exported = load(tmp_path / "run").backbone
    from_ckpt = load(tmp_path / "run" / "checkpoint-00000002.pt").backbone
    t.method.backbone().eval()
    with torch.no_grad():
        ref = t.method.backbone()(x)
        assert torch.equal(exported(x), ref) and torch.equal(from_ckpt(x), ref)


def test_teacher_takes_no_gradient_and_the_last_layer_waits(tmp_path):
    cfg = tiny_config(optim={"steps": 3, "freeze_last_layer_epochs": 100.0, "schedule_epochs": None})
    t = Trainer(cfg, tmp_path / "run")
    v0 = t.method.student["head"].last_layer.weight_v.detach().clone()
    t.fit()
    assert all(not p.requires_grad for p in t.method.teacher.parameters())
    assert torch.equal(t.method.student["head"].last_layer.weight_v, v0)  # frozen through the first epoch
    assert not torch.equal(t.method.student["head"].mlp[0].weight, t.method.teacher["head"].mlp[0].weight)
