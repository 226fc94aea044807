"""Every method of the family trains a few steps end to end: finite losses, gradients only in the student,
the momentum networks follow it, and the pieces each method adds (queue, masks, heads, EMA) do their job."""
import shutil

import pytest
import torch

from selfsup.errors import UserError
from selfsup.methods import build_method
from selfsup.training.checkpoint import load_checkpoint
from selfsup.training.trainer import Trainer
from selfsup.weights import load, resolve_init, save_backbone
from tiny import tiny_config

HEADS = {"simclr": {"hidden_dim": 32, "out_dim": 16}, "byol": {"hidden_dim": 32, "out_dim": 16},
         "moco": {"hidden_dim": 32, "out_dim": 16, "pred_hidden_dim": 32, "queue_size": 32},
         "ibot": {"head_n_prototypes": 128, "head_hidden_dim": 32, "head_bottleneck_dim": 16}}
TWO_VIEWS = {"crops": {"n_local": 0}}


def config(method: str, steps: int = 3, **extra):
    extra = {**({k: v for k, v in HEADS.items() if k != "ibot"}), "ibot": HEADS["ibot"], **extra}
    if method in ("simclr", "moco", "byol"):
        extra = {**TWO_VIEWS, **extra}
    return tiny_config(method, steps, **extra)


def run(cfg, tmp_path, name: str) -> Trainer:
    trainer = Trainer(cfg, tmp_path / name)
    trainer.fit()
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method,extra", [
    ("simclr", {}),
    ("moco", {}),
    ("moco", {"moco": {"version": 2, "momentum": 0.999, "momentum_end": 0.999}}),
    ("moco", {"moco": {"version": 2, "shuffle_bn": 2}, "backbone": {"arch": "resnet18", "cifar_stem": True}}),
    ("byol", {}),
    ("ibot", {"ibot": {"mask_sample_probability": 1.0}}),
    ("ibot", {"ibot": {"mask_sample_probability": 0.0}}),  # no masks: no MIM term, no error
    ("dinov2", {"ibot": {"separate_head": True, "mask_sample_probability": 1.0},
                "backbone": {"layerscale": 1e-5, "n_registers": 1, "drop_path": 0.1, "drop_path_uniform": True}}),
])
def test_method_trains_with_gradients_only_in_the_student(tmp_path, method, extra):
    cfg = config(method, steps=2, **extra)
    trainer = Trainer(cfg, tmp_path / "run")
    m = trainer.method
    teachers = m.teachers()
    before = [snapshot(t) for t in teachers]
    student_before = snapshot(m.backbone() if not teachers else m.student["backbone"])
    trainer.fit()
    rows = [r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all('"loss": NaN' not in r for r in rows)
    for t, old in zip(teachers, before):
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
        assert any(not torch.equal(v, old[k]) for k, v in t.state_dict().items())  # the EMA moved it
    after = m.student["backbone"].state_dict()
    assert any(not torch.equal(after[k], student_before[k]) for k in after)
    if method == "moco" and cfg.moco.version == 2:
        assert int(m.queue_ptr) == (2 * cfg.optim.batch_size) % cfg.moco.queue_size
    if method in ("ibot", "dinov2"):
        assert "center_patch" in dict(m.named_buffers())
        assert ("ibot_head" in m.student) == cfg.ibot.separate_head


def test_ibot_student_sees_masks_and_the_mim_loss_is_counted(tmp_path):
    cfg = config("ibot", steps=1, ibot={**HEADS["ibot"], "mask_sample_probability": 1.0})
    trainer = run(cfg, tmp_path, "run")
    import json

    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.1 <= row["masked_share"] <= 0.5 and row["loss_mim"] > 0
    assert abs(row["loss"] - row["loss_cls"] - row["loss_mim"]) < 1e-4
    assert trainer.method.masking() is not None


def test_byol_without_predictor_and_shape_errors():
    from selfsup.errors import UserError
    from selfsup.methods import build_method

    cfg = config("byol", byol={**HEADS["byol"], "predictor": False})
    assert isinstance(build_method(cfg).student["predictor"], torch.nn.Identity)
    with pytest.raises(UserError, match="n_global must be 2"):
        build_method(config("simclr", crops={"n_global": 3, "n_local": 0}))
    with pytest.raises(UserError, match="multiple of optim.batch_size"):
        build_method(config("moco", moco={**HEADS["moco"], "version": 2, "queue_size": 20}))


def test_shuffling_bn_encodes_queries_in_groups_and_keys_in_groups_of_a_shuffled_batch():
    from selfsup.errors import UserError
    from selfsup.methods import build_method
    from selfsup.methods.siamese import MomentumSiamese

    cfg = config("moco", moco={**HEADS["moco"], "version": 2, "shuffle_bn": 2},
                 backbone={"arch": "resnet18", "cifar_stem": True})
    m = build_method(cfg).train()
    x = torch.randn(8, 3, 16, 16)
    plain_q, plain_k = MomentumSiamese.online(m, x), MomentumSiamese.target(m, x)
    q = m.online(x)
    assert torch.allclose(q, torch.cat([MomentumSiamese.online(m, x[:4]), MomentumSiamese.online(m, x[4:])]))
    assert not torch.allclose(q, plain_q, atol=1e-3)  # BatchNorm statistics of each half, not of the batch
    k = m.target(x)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(cfg.train.seed * 1_000_003))  # the first draw
    assert int(m.shuffles) == 1 and not torch.equal(perm, torch.arange(8))
    shuffled = torch.cat([MomentumSiamese.target(m, x[perm[:4]]), MomentumSiamese.target(m, x[perm[4:]])])
    assert torch.allclose(k, shuffled[torch.argsort(perm)]) and not torch.allclose(k, plain_k, atol=1e-3)
    m.eval()  # running statistics: the groups change nothing, so every key is back at its own image
    assert torch.allclose(m.target(x), MomentumSiamese.target(m, x), atol=1e-5)
    with pytest.raises(UserError, match="moco.shuffle_bn=8: expected a multiple of the 1 ranks with 2 images"):
        build_method(config("moco", moco={**HEADS["moco"], "version": 2, "shuffle_bn": 8}))


def test_distill_from_a_dinov2_run_keeps_the_student_ema(tmp_path):
    teacher_cfg = config("dinov2", steps=1, ibot={**HEADS["ibot"], "separate_head": True})
    run(teacher_cfg, tmp_path, "teacher")
    cfg = config("distill", steps=2, distill={"teacher": str(tmp_path / "teacher")},
                 ibot={**HEADS["ibot"], "mask_sample_probability": 0.0}, dino={"out_dim": 128})
    trainer = Trainer(cfg, tmp_path / "student")
    m = trainer.method
    frozen = snapshot(m.teacher)
    trainer.fit()
    assert all(torch.equal(v, frozen[k]) for k, v in m.teacher.state_dict().items())  # the teacher is fixed
    assert m.backbone() is m.student_ema["backbone"]
    assert m.student["head"].last_layer.weight_v.shape[0] == teacher_cfg.dino.out_dim
    assert "ibot_head" in m.student
    # the saved config is the one that built the student; its backbone loads without the teacher run
    saved = load_checkpoint(tmp_path / "student")["config"]
    assert saved["dino"]["out_dim"] == teacher_cfg.dino.out_dim != cfg.dino.out_dim
    shutil.rmtree(tmp_path / "teacher")
    kept = load(tmp_path / "student" / "checkpoint-00000002.pt").backbone
    assert all(torch.equal(v, m.backbone().state_dict()[k]) for k, v in kept.state_dict().items())
    with pytest.raises(UserError, match=f"distill.teacher={tmp_path / 'teacher'}: no such run folder"):
        Trainer(cfg, tmp_path / "again")


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "dino", "ibot", "dinov2"])
def test_the_kept_prefix_names_the_evaluated_backbone(method):
    m = build_method(config(method))
    prefix = type(m).keeps + "."
    kept = {k[len(prefix):]: v for k, v in m.state_dict().items() if k.startswith(prefix)}
    own = m.backbone().state_dict()
    assert kept.keys() == own.keys() and all(v is own[k] or torch.equal(v, own[k]) for k, v in kept.items())


def test_init_from_loads_the_whole_method_or_only_the_backbone(tmp_path):
    first = run(config("dino", steps=1), tmp_path, "dino")
    save_backbone(first.method.backbone(), first.cfg, tmp_path / "dino" / "backbone.safetensors")  # as the CLI does
    # same method: heads, teacher and centre come along
    cfg = config("dino", steps=1, backbone={"depth": 2})  # the architecture is taken from the checkpoint
    init = resolve_init(cfg, str(tmp_path / "dino"))
    assert cfg.backbone.depth == 1
    same = Trainer(cfg, tmp_path / "again").method
    assert "whole method" in init(same)
    assert torch.equal(same.center, first.method.center)
    # another method: the backbone only, into the student and its momentum teacher
    cfg = config("byol", steps=1)
    init = resolve_init(cfg, str(tmp_path / "dino" / "backbone.safetensors"))
    byol = Trainer(cfg, tmp_path / "byol").method
    assert "backbone" in init(byol)
    want = first.method.backbone().state_dict()
    for b in byol.backbones():
        assert all(torch.equal(v, want[k]) for k, v in b.state_dict().items())
