"""Every config value is checked when the config is loaded: a bad one is one line naming the key, the value and
what was expected, exit code 2, no traceback and no run folder, before any data or model is built."""
import dataclasses
import subprocess
import sys
import types
import typing

import pytest

from selfsup.cli import main
from selfsup.config import (RECIPES, RULES, Config, Duration, EachOf, Leaf, OneOf, Pattern, Range, apply, leaves,
                            load_recipe, parse_duration, parse_override, validate)
from selfsup.errors import UserError


def leaf_keys(cfg, prefix: str = "") -> set[str]:
    """The dotted leaf keys of a config instance, found from its values (not from the rules)."""
    keys = set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys |= leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name}
    return keys


def without_none(tp):
    """X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


WRONG_TYPE = {bool: "maybe", int: "1.5", float: "abc", str: "[1, 2]"}  # as typed after key= on the command line


def wrong_type(leaf: Leaf) -> str:
    tp = without_none(leaf.type)
    return "abc" if typing.get_origin(tp) is tuple else WRONG_TYPE[tp]


def out_of_range(leaf: Leaf) -> str | None:
    """A value of the key's type that its rules reject (YAML), from the first rule that rejects some; None for ANY."""
    for rule in leaf.rules:
        if isinstance(rule, OneOf):
            return "nope" if isinstance(rule.choices[0], str) else str(max(rule.choices) + 1)
        if isinstance(rule, Range):
            x = str(rule.lo if rule.open_lo else rule.lo - 1)
            n = len(typing.get_args(without_none(leaf.type)))  # a tuple: every number out of range
            return f"[{', '.join([x] * n)}]" if n else x
        if isinstance(rule, Pattern):
            return ""
        if isinstance(rule, Duration):
            return "soon"
        if isinstance(rule, EachOf):
            return "[nope]"
    return None


def walk_cases():
    for key, leaf in RULES.items():
        yield pytest.param(key, wrong_type(leaf), id=f"{key}-wrong-type")
        bad = out_of_range(leaf)
        if bad is not None:
            yield pytest.param(key, bad, id=f"{key}-out-of-range")


@pytest.fixture
def no_training(monkeypatch):
    """A config that gets past the checks fails the test here, before any data or model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bad config reached the trainer")

    monkeypatch.setattr("selfsup.api.run.Trainer", refuse)


def error_line(stderr: str) -> str:
    """The only non-empty line of stderr, a `selfsup: error:` line without a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfsup: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("key, value", walk_cases())
def test_every_key_rejects_bad_values(key, value, tmp_path, capsys, no_training):
    out = tmp_path / "run"
    assert main(["train", f"{key}={value}", "--steps", "1", "--out", str(out)]) == 2
    assert key in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_every_leaf_key_has_rules():
    assert set(RULES) == leaf_keys(Config())
    assert all(leaf.rules for leaf in RULES.values())


def test_a_key_without_a_rule_is_caught():
    @dataclasses.dataclass
    class Extended(Config):
        new_key: int = 3

    with pytest.raises(TypeError, match="config key 'new_key' has no rule"):
        leaves(Extended)


def choices(key: str) -> tuple:
    return next(r.choices for r in RULES[key].rules if isinstance(r, OneOf))


def test_choices_are_what_the_code_implements():
    from selfsup.methods import METHODS
    from selfsup.nn import RESNETS, VIT_SIZES
    from selfsup.nn.attention import BACKENDS
    from selfsup.training.distributed import WRAPPERS
    from selfsup.training.optim import OPTIMIZERS

    assert tuple(choices("method")) == tuple(METHODS)
    assert choices("backbone.arch") == (*VIT_SIZES, *RESNETS)
    assert set(choices("train.attention")) == {"auto", *BACKENDS}
    assert choices("train.distributed") == WRAPPERS
    assert choices("optim.optimizer") == OPTIMIZERS


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_passes(name):
    cfg = Config()
    load_recipe(cfg, name)
    validate(cfg)


def test_defaults_pass():
    validate(Config())


def configured(*overrides: str) -> Config:
    cfg = Config()
    for o in overrides:
        apply(cfg, parse_override(o), "test")
    return cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.steps=0"], "bad value for 'optim.steps': 0 (expected null or an integer >= 1)"),
    (["crops.global_scale=[0.9, 0.5]"],
     "bad value for 'crops.global_scale': [0.9, 0.5] (expected 2 numbers in (0, 1], the first <= the second)"),
    (["crops.blur=[1, 0.1, 1.5]"], "bad value for 'crops.blur': [1.0, 0.1, 1.5] (expected 3 numbers in [0, 1])"),
    (["backbone.drop_path=1"], "bad value for 'backbone.drop_path': 1.0 (expected a number in [0, 1))"),
    (["optim.layerwise_decay=0"], "bad value for 'optim.layerwise_decay': 0.0 (expected a number in (0, 1])"),
    (["optim.lr=.inf"], "bad value for 'optim.lr': inf (expected a number >= 0)"),
    (["moco.version=1"], "bad value for 'moco.version': 1 (expected one of: 2, 3)"),
    (["train.device=gpu"], "bad value for 'train.device': 'gpu' (expected auto, cpu, cuda or cuda:N)"),
    (["backbone.patch_size=16", "backbone.img_size=8"],
     "bad value for 'backbone.img_size': 8 (expected at least backbone.patch_size = 16)"),
    (["crops.n_global=1", "crops.n_local=0"],
     "bad value for 'crops.n_local': 0 (expected at least 1 with crops.n_global = 1, for 2 views)"),
    (["train.time=soon"], "bad value for 'train.time': 'soon' (expected null or a positive duration like 90s, "
                          "10m, 2h or 1h30m)"),
    (["train.collapse_patience=0"], "bad value for 'train.collapse_patience': 0 (expected an integer >= 1)"),
    (["train.memory_fraction=1.5"], "bad value for 'train.memory_fraction': 1.5 (expected a number in (0, 1])"),
    (["train.memory_limit_gib=0"],
     "bad value for 'train.memory_limit_gib': 0.0 (expected null or a number > 0)"),
    (["data.source="], "bad value for 'data.source': '' (expected a non-empty string)"),
])
def test_messages_name_key_value_and_expectation(overrides, message):
    with pytest.raises(UserError) as e:
        validate(configured(*overrides))
    assert str(e.value) == message


@pytest.mark.parametrize("overrides", [
    ["backbone.arch=resnet18", "crops.global_size=7", "crops.local_size=7"],  # no patches in a ResNet
    ["train.device=cuda:1", "train.time=1h30m", "train.memory_limit_gib=12", "train.memory_fraction=1"],
    ["crops.n_global=1", "crops.n_local=1", "optim.steps=null", "backbone.depth=1"],
])
def test_good_values_pass(overrides):
    validate(configured(*overrides))


def test_new_train_keys_have_their_defaults():
    t = Config().train
    assert (t.time, t.stop_on_collapse, t.collapse_patience, t.memory_fraction, t.memory_limit_gib) == (
        None, False, 100, 0.7, None)


def test_a_config_built_in_code_is_type_checked():
    cfg = Config()
    cfg.optim.batch_size = "8"
    with pytest.raises(UserError, match="bad value for 'optim.batch_size': '8'"):
        validate(cfg)


@pytest.mark.parametrize("key", ["data.source", "data.eval_source"])
def test_a_list_is_not_a_string(key):
    with pytest.raises(UserError, match=f"bad value for '{key}': \\[1, 2\\]"):
        apply(Config(), parse_override(f"{key}=[1, 2]"), "command line")


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5h", 5400), ("2d", 172800)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0s", "90", "1h 30m", ""])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError, match=f"bad value for 'train.time': '{text}' \\(expected a positive duration"):
        parse_duration(text)


def test_bench_checks_its_config(capsys, monkeypatch):
    monkeypatch.setattr("selfsup.commands.bench.measure", lambda *a, **k: pytest.fail("a bad config reached the benchmark"))
    assert main(["bench", "--batch-size", "0"]) == 2
    assert error_line(capsys.readouterr().err) == (
        "selfsup: error: bad value for 'optim.batch_size': 0 (expected an integer >= 1)")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "bad value for 'optim.batch_size': 0 (expected an integer >= 1)"),
    (["crops.global_size=7", "--patch-size", "14"],
     "bad value for 'crops.global_size': 7 (expected at least backbone.patch_size = 14)"),
    (["backbone.ffn=swigl"], "bad value for 'backbone.ffn': 'swigl' (expected one of: mlp, swiglu)"),
    (["optim.lr_scaling=sqrtt"], "bad value for 'optim.lr_scaling': 'sqrtt' (expected one of: linear, sqrt, none)"),
    (["--epochs", "-1"], "bad value for 'optim.epochs': -1.0 (expected a number > 0)"),
    (["optim.lr=-1"], "bad value for 'optim.lr': -1.0 (expected a number >= 0)"),
])
def test_reported_cases_exit_2_with_one_line(args, message, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "selfsup", "train", *args, "--out", str(out)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr) == f"selfsup: error: {message}"
    assert not out.exists()
