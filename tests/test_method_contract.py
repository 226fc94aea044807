"""A method is one file: what it reads of the config is its `sections`, a run saves those only (with a
config_version, older runs still loading and resuming), and a method defined outside the package (SimSiam,
here) trains, resumes and is evaluated once registered, with no change to any other file."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from selfsup.cli import main
from selfsup.config import (EXTRA_SECTIONS, METHOD_NAMES, METHOD_SECTIONS, RECIPE_DIRS, Config, Range, apply, checked,
                            from_dict, run_dict, to_dict, validate)
from selfsup.errors import UserError
from selfsup.methods import METHODS, Method, build_method, register_method
from selfsup.methods.base import Batch
from selfsup.methods.schedule import Progress
from selfsup.nn import backbone_from_config, feature_dim
from selfsup.nn.heads import ProjectionMLP
from selfsup.training.checkpoint import load_checkpoint
from selfsup.training.schedules import Schedules
from selfsup.training.trainer import Trainer
from selfsup.weights import load
from test_methods_train import config
from tiny import ARGS


@dataclass
class SimSiamConfig:
    """Its own config section: projector and predictor sizes (SimSiam Sec. 3: 2048 and a 512 bottleneck)."""

    hidden_dim: int = checked(512, Range(1))
    out_dim: int = checked(2048, Range(1))


class SimSiam(Method):
    """SimSiam (Chen & He, 2021): D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 with D the negative cosine
    (Eq. 1-2); no momentum encoder."""

    name = "simsiam"
    sections = ("simsiam",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        b = cfg.simsiam
        backbone = backbone_from_config(cfg.backbone)
        self.student = nn.ModuleDict({"backbone": backbone,
                                      "projector": ProjectionMLP(feature_dim(backbone), b.hidden_dim, b.out_dim),
                                      "predictor": ProjectionMLP(b.out_dim, b.hidden_dim, b.out_dim)})

    def student_modules(self) -> dict[str, nn.Module]:
        return dict(self.student.items())

    def backbone(self) -> nn.Module:
        return self.student["backbone"]

    def forward(self, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        z1, z2 = (self.student["projector"](self.student["backbone"](x)) for x in batch.global_crops.chunk(2))
        p1, p2 = self.student["predictor"](z1), self.student["predictor"](z2)
        d = lambda p, z: -F.cosine_similarity(p, z.detach(), dim=-1).mean()  # noqa: E731
        return {"loss": d(p1, z2) / 2 + d(p2, z1) / 2}


class Forbidden:
    """A config section a method must not read."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, key: str):
        raise AssertionError(f"read {self.name}.{key}, which is not among the method's sections")


def hand_batch(cfg: Config, m: Method, B: int = 4) -> Batch:
    """Random global (and local) crops at the config's sizes, with the method's masks."""
    c = cfg.crops
    g = torch.randn(c.n_global * B, 3, c.global_size, c.global_size)
    local = torch.randn(c.n_local * B, 3, c.local_size, c.local_size) if c.n_local else None
    masking = m.masking()
    rng = np.random.default_rng(0)
    if masking is None:
        masks = None
    elif hasattr(masking, "batch"):  # DINOv2's rule draws the batch's masks together
        masks = masking.batch(rng, B)
    else:  # iBOT's per image: its crops, crop-major as MultiCrop
        masks = torch.stack([masking(rng) for _ in range(B)], 1).flatten(0, 1)
    return Batch(g, local, masks, torch.zeros(B), c.n_global, c.n_local)


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "dino", "ibot", "dinov2"])
def test_a_method_reads_only_its_own_sections(method):
    cfg = config(method, ibot={"head_n_prototypes": 128, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                               "mask_sample_probability": 1.0})
    cls = type(build_method(cfg))
    for name in set(METHOD_SECTIONS) - set(cls.sections):
        setattr(cfg, name, Forbidden(name))
    m = build_method(cfg)  # building, the schedules, a step and its hooks
    progress = Schedules.build(cfg, m.schedules(), 10, 10).progress(0)
    m(hand_batch(cfg, m), progress)["loss"].backward()
    m.before_optimizer_step(progress)
    m.after_step(progress)
    assert m.collapse_checks() is not None


def test_a_run_saves_its_own_sections_and_a_version(tmp_path):
    trainer = Trainer(config("simclr", steps=1), tmp_path / "run")
    trainer.fit()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["config_version"] == 2 and "simclr" in saved
    assert not set(saved) & (set(METHOD_SECTIONS) - {"simclr"})  # no DINO prototypes in a SimCLR run
    assert load_checkpoint(tmp_path / "run")["config"] == saved
    again = from_dict(saved)  # the saved sections read back; the others are the defaults
    assert run_dict(again, ("simclr",)) == saved and to_dict(again.dino) == to_dict(Config().dino)
    with pytest.raises(UserError, match="config_version 3 .* a newer selfsup wrote it"):
        from_dict({**saved, "config_version": 3})


@pytest.mark.parametrize("method", ["byol", "moco"])
def test_version_1_kept_byol_and_moco_momentum_in_teacher(method):
    old = {"method": method, "teacher": {"momentum": 0.97, "momentum_end": 0.98, "temp": 0.07}}
    cfg = from_dict(old)
    section = getattr(cfg, method)
    assert (section.momentum, section.momentum_end) == (0.97, 0.98)
    assert to_dict(cfg.teacher) == to_dict(Config().teacher)
    with pytest.raises(UserError, match=f"'teacher.momentum': 0.97 .*{method}'s momentum is {method}.momentum"):
        cfg = from_dict({"method": method, "config_version": 2})
        apply(cfg, {"teacher": {"momentum": 0.97}}, "command line")  # a command-line override
        validate(cfg)


def test_a_checkpoint_in_the_version_1_format_loads_and_resumes_bit_identically(tmp_path):
    """Version 1 (before issue 14): every section in the config, no version key."""
    cfg = config("dino", steps=4, train={"checkpoint_every": 2, "keep_last": 5})
    Trainer(cfg, tmp_path / "whole").fit()
    whole = [json.loads(r)["loss"] for r in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    run = tmp_path / "old"
    run.mkdir()
    state = torch.load(tmp_path / "whole" / "checkpoint-00000002.pt", weights_only=False)
    state["config"] = to_dict(cfg)  # the version 1 layout
    assert "config_version" not in state["config"] and "moco" in state["config"]
    torch.save(state, run / "checkpoint-00000002.pt")
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {i + 1}, "loss": {v}}}\n' for i, v in enumerate(whole[:2])))
    assert load(run / "checkpoint-00000002.pt").backbone is not None
    Trainer(cfg, run, resume=True).fit()
    resumed = [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed == whole


@pytest.fixture
def registry():
    """The registries as they were, after the test."""
    saved = dict(METHODS), list(METHOD_NAMES), list(RECIPE_DIRS), dict(EXTRA_SECTIONS)
    yield
    METHODS.clear()
    METHODS.update(saved[0])
    METHOD_NAMES[:], RECIPE_DIRS[:] = saved[1], saved[2]
    EXTRA_SECTIONS.clear()
    EXTRA_SECTIONS.update(saved[3])


def test_a_method_registered_at_run_time_trains_resumes_and_is_evaluated(tmp_path, capsys, registry):
    recipes = tmp_path / "recipes"  # a method is its file and its recipes
    recipes.mkdir()
    (recipes / "simsiam_mnist5k.yaml").write_text(yaml.safe_dump({
        "method": "simsiam", "crops": {"n_local": 0}, "simsiam": {"hidden_dim": 16, "out_dim": 32},
        "backbone": {"arch": "vit_tiny"},
        "optim": {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-4, "weight_decay_end": 1e-4}}))
    register_method("simsiam", SimSiam, recipes, SimSiamConfig)
    run = tmp_path / "run"
    base = [*ARGS, "crops.n_local=0", "train.checkpoint_every=1", "--method", "simsiam", "--out", str(run)]
    assert main(["train", *base, "--steps", "2"]) == 0
    assert main(["train", *base, "--steps", "3", "--resume"]) == 0
    assert main(["eval", "knn", "--checkpoint", str(run), "--json"]) == 0
    knn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= knn["top1"] <= 100
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "simsiam" and saved["simsiam"] == {"hidden_dim": 16, "out_dim": 32}
    assert not set(saved) & set(METHOD_SECTIONS)  # none of the shipped methods' sections
    bad = [*ARGS, "simsiam.hidden_dim=0", "--method", "simsiam", "--out", str(tmp_path / "bad")]
    assert main(["train", *bad]) == 2 and not (tmp_path / "bad").exists()  # its keys are checked like the others
    kept = load(run).backbone.state_dict()
    trained = load_checkpoint(run)["method_state"]
    assert all(torch.equal(v, trained[f"student.backbone.{k}"]) for k, v in kept.items())
