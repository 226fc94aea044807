"""Recipes, overrides and their errors."""
from importlib import resources

import pytest
import torch

from selfsup.config import Config, apply, from_dict, load_recipe, parse_override, to_dict
from selfsup.errors import UserError
from selfsup.methods import METHODS, build_method


def test_override_types():
    cfg = Config()
    apply(cfg, parse_override("optim.lr=1e-3"), "cli")
    apply(cfg, parse_override("crops.global_scale=[0.3, 1]"), "cli")
    apply(cfg, parse_override("backbone.layerscale=null"), "cli")
    apply(cfg, parse_override("optim.steps=7"), "cli")
    assert cfg.optim.lr == 1e-3 and cfg.crops.global_scale == (0.3, 1.0) and cfg.backbone.layerscale is None
    assert cfg.optim.steps == 7


@pytest.mark.parametrize("text, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("optim.batch_size=big", "bad value for 'optim.batch_size'"),
    ("crops.global_scale=[1]", "expected a list of 2"),
    ("optim.lr", "expected key.sub=value"),
])
def test_bad_overrides_name_the_key(text, message):
    with pytest.raises(UserError, match=message):
        apply(Config(), parse_override(text), "command line")


def test_recipe_round_trip():
    cfg = Config()
    load_recipe(cfg, "dino_mnist5k")
    assert from_dict(to_dict(cfg)) == cfg


def test_unknown_recipe(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(Config(), "no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, 2}")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(Config(), str(bad))


RECIPES = sorted(f.name[:-5] for f in resources.files("selfsup.configs").iterdir() if f.name.endswith(".yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_loads_and_builds_its_method(name):
    cfg = Config()
    load_recipe(cfg, name)
    assert cfg.method in METHODS and name.startswith(cfg.method)
    if cfg.method == "distill":  # needs a teacher run; its config is checked above
        return
    with torch.device("meta"):  # no memory, no init: the ImageNet recipes build in milliseconds
        method = build_method(cfg)
    assert sum(p.numel() for p in method.parameters()) > 0


def test_moco_v2_recipe_is_the_paper():
    cfg = Config()
    load_recipe(cfg, "moco_v2_imagenet")
    assert (cfg.moco.version, cfg.moco.queue_size, cfg.moco.temperature) == (2, 65536, 0.2)
    assert (cfg.moco.momentum, cfg.moco.momentum_end) == (0.999, 0.999)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.batch_size, cfg.optim.weight_decay) == ("sgd", 0.03, 256, 1e-4)
    assert cfg.optim.decay_all and cfg.moco.shuffle_bn == 8
