"""A run fitted to the data and the machine: the recipe, the batch that fits, the length from a time budget, the
ETA and the log lines, and the collapse watchdog."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfsup.config import Config, apply, load_recipe
from selfsup.data.sources import open_folder
from selfsup.errors import UserError
from selfsup.core.machine import usable_cores
from selfsup.training.auto import DataProfile, fitted, profile
from selfsup.training.plan import MemoryFit, fit_batch, plan_run
from selfsup.training.trainer import Collapsed, Trainer
from selfsup.methods.collapse import CollapseCheck, teacher_checks
from selfsup.training.watchdog import Watchdog

from tiny import tiny_config

MiB = 2**20


def selfsup(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "selfsup", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("selfsup: error:")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """60 photos of 40-56 x 36-60 px in 2 class folders (median short side 40)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(60):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(exist_ok=True)
        w, h = int(rng.integers(40, 57)), int(rng.integers(36, 61))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    return root


class FakeMemory:
    """Peak memory of a step at batch b: 100 MiB + 10 MiB x b."""

    def __init__(self):
        self.b = 0

    def reset(self):
        pass

    def read(self) -> float:
        return 100 + 10 * self.b


def test_fit_batch_stops_doubling_before_the_budget_and_solves_the_line():
    memory, tried = FakeMemory(), []

    def step(b):
        tried.append(b)
        memory.b = b

    fit = fit_batch(step, torch.device("cpu"), target=1024, budget=500 * MiB, memory=memory)
    assert fit.largest_batch == 40  # 100 + 10 b <= 500
    assert tried == [2, 4, 8, 16, 32]  # 64 would need 740 MiB: never tried
    assert fit.needed(64) == pytest.approx(740 * MiB)


def test_fit_batch_keeps_an_explicit_batch_that_fits_and_stops_at_an_out_of_memory_error():
    memory = FakeMemory()

    def step(b):
        memory.b = b

    assert fit_batch(step, torch.device("cpu"), 24, 10**6 * MiB, memory=memory).largest_batch == 24

    def oom_at_16(b):
        if b >= 16:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        memory.b = b

    assert fit_batch(oom_at_16, torch.device("cpu"), 64, 10**6 * MiB, memory=memory).largest_batch == 15

    def bug(b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # not an answer about memory
        fit_batch(bug, torch.device("cpu"), 64, 10**6 * MiB, memory=memory)


def test_memory_fit_line():
    fit = MemoryFit(0, 300.0, {2: 120.0, 4: 140.0})
    assert fit.needed(10) == 200.0 and fit.solve() == 20.0


@pytest.mark.parametrize("side, cuda, expected", [
    (500, True, {"global_size": 224, "local_size": 96, "patch_size": 16}),  # the paper's recipe on a GPU
    (32, True, {"global_size": 32, "local_size": 12, "patch_size": 4}),  # CIFAR-sized images on a GPU
    (500, False, {"global_size": 64, "local_size": 32, "patch_size": 16}),  # photos on a CPU: 4 x 4 tokens
    (28, False, {"global_size": 28, "local_size": 14, "patch_size": 14}),  # digits on a CPU: dino_mnist5k's 2 x 2
    (32, False, {"global_size": 32, "local_size": 16, "patch_size": 8}),  # CIFAR-sized on a CPU: 4 x 4
])
def test_fitted_recipe(side, cuda, expected):
    device = torch.device("cuda" if cuda else "cpu")
    recipe, over, why = fitted("dino", DataProfile(50_000, side, 300), device, cores=8, user={})
    assert recipe == ("dino_imagenet" if cuda else "dino_mnist5k")
    got = {"global_size": over["crops"]["global_size"], "local_size": over["crops"]["local_size"],
           "patch_size": over["backbone"]["patch_size"]}
    assert got == expected
    assert over["crops"]["global_size"] <= side and over["crops"]["global_size"] % got["patch_size"] == 0
    workers = over["data"]["num_workers"]
    assert 1 <= workers <= 8 and workers + over.get("train", {}).get("threads", 0) <= 8
    assert any("median short side" in line for line in why)


def test_fitted_recipe_respects_the_users_patch_and_arch():
    _, over, why = fitted("dino", DataProfile(1000, 100, 300), torch.device("cpu"), 2,
                          {"backbone": {"patch_size": 8, "arch": "vit_small"}})
    assert over["backbone"]["patch_size"] == 8 and over["crops"]["global_size"] == 64
    assert "depth" not in over["backbone"]  # the user's architecture keeps its blocks
    assert any("usable core(s): vit_small, patch 8 (8 x 8 tokens)" in line for line in why)  # says what runs
    _, over, why = fitted("dino", DataProfile(1000, 28, 300), torch.device("cpu"), 2,
                          {"backbone": {"depth": 3, "patch_size": 7}})
    assert over["backbone"]["patch_size"] == 7
    assert any("usable core(s): vit_tiny, 3 blocks, patch 7 (4 x 4 tokens)" in line for line in why)


@pytest.mark.parametrize("method, patch, depth", [("dino", 14, 2), ("ibot", 7, 2), ("distill", 7, 1)])
def test_fitted_recipe_keeps_the_cpu_recipes_backbone_for_small_images(method, patch, depth):
    _, over, _ = fitted(method, DataProfile(1000, 28, 300), torch.device("cpu"), 2, {})
    assert (over["backbone"]["patch_size"], over["backbone"]["depth"]) == (patch, depth)  # as <method>_mnist5k.yaml
    _, over, _ = fitted("dino", DataProfile(1000, 20, 300), torch.device("cpu"), 2, {})  # 14 px: one token
    assert (over["backbone"]["patch_size"], over["backbone"]["depth"]) == (4, 4)
    _, over, _ = fitted("dino", DataProfile(1000, 64, 300), torch.device("cpu"), 2, {})
    assert over["backbone"]["depth"] == 4 and over["backbone"]["patch_size"] == 16


def test_profile_reads_the_median_short_side(photos):
    p = profile(open_folder(photos))
    assert p.n_images == 60 and p.sampled == 60 and 36 <= p.short_side <= 56


def test_trial_steps_leave_the_run_as_it_was(tmp_path):
    trainer = Trainer(tiny_config(steps=4), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    rng = torch.get_rng_state()
    lines = plan_run(trainer, choose_batch=False, budget_s=None, started=0.0)
    assert any(line.startswith("memory: batch 8 fits") for line in lines)
    assert trainer.step == 0 and not trainer.optimizer.state
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in trainer.method.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_explicit_batch_that_cannot_fit_is_one_line_with_the_largest_that_fits(tmp_path):
    # ~20 MiB per image at 112-px crops of a 384-wide ViT; 2.5 GiB for the whole process
    r = selfsup("train", "--data", "digits", "--arch", "vit_small", "--patch-size", "14", "--batch-size", "1024",
                "backbone.depth=2", "crops.global_size=112", "crops.local_size=56", "train.memory_limit_gib=2.5",
                "--steps", "1", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert "optim.batch_size=1024 does not fit in memory" in line
    largest = int(line.split("the largest batch that fits is ")[1].split()[0])
    assert 2 <= largest < 1024 and f"--batch-size {largest}" in line
    assert not (tmp_path / "run").exists()


def test_a_folder_without_config_gets_a_fitted_recipe_an_eta_and_log_lines(tmp_path, photos):
    out = tmp_path / "run"
    r = selfsup("train", "--data", str(photos), "--steps", "6", "train.log_every=2", "eval.final=false",
                "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "recipe fitted" in r.stderr and "median short side" in r.stderr
    eta = [line for line in r.stderr.splitlines() if line.startswith("ETA ")]
    assert len(eta) == 1 and "6 steps" in eta[0]
    steps = [line for line in r.stderr.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/6", "4/6", "6/6"] and all("ETA" in s and "img/s" in s for s in steps)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    side = profile(open_folder(photos)).short_side
    assert side - cfg["backbone"]["patch_size"] < cfg["crops"]["global_size"] <= side
    assert cfg["crops"]["global_size"] % cfg["backbone"]["patch_size"] == 0
    assert cfg["data"]["num_workers"] + cfg["train"]["threads"] <= max(2, usable_cores())
    assert cfg["optim"]["batch_size"] <= 24  # 48 training images: a few batches per epoch
    log = (out / "train.log").read_text()
    assert "recipe fitted" in log and "step 6/6" in log and "ETA" in log


def test_time_budget_sets_the_steps_and_too_short_a_budget_is_one_line(tmp_path, photos):
    out = tmp_path / "run"
    r = selfsup("train", "--data", str(photos), "--time", "20s", "eval.final=false", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "time budget 20s:" in r.stderr
    steps = yaml.safe_load((out / "config.yaml").read_text())["optim"]["steps"]
    assert steps >= 1 and json.loads((out / "results.json").read_text())["steps"] == steps
    r = selfsup("train", "--data", str(photos), "--time", "1s", "--out", str(tmp_path / "short"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert "train.time=1s: too short" in line


def test_a_time_budget_is_kept_when_steps_run_slower_than_the_trial_steps(tmp_path, monkeypatch):
    """The plan fits 400 steps to 40 s (0.1 s a step), but the steps take 0.2 s (a clock that the steps move):
    at step 100 the run is cut to the 200 steps that end at the planned time, schedules and config.yaml with it."""
    cfg = tiny_config(steps=400)
    cfg.train.time = "40s"
    trainer = Trainer(cfg, tmp_path / "run")
    now = [0.0]
    trainer.clock = lambda: now[0]

    def plan(t, *args):
        t.train_until = 40.0
        return []

    monkeypatch.setattr("selfsup.training.trainer.plan_run", plan)
    real = trainer.train_step

    def step(views):
        now[0] += 0.2
        return real(views)

    trainer.train_step = step
    result = trainer.fit()
    assert result["steps"] == trainer.total_steps == 200 and now[0] == pytest.approx(40.0)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["steps"] == 200
    lr = trainer.schedules.lr
    assert len(lr) == 200 and lr[-1] == pytest.approx(cfg.optim.min_lr, abs=1e-9) and lr[150] < lr[100]


def test_running_out_of_memory_mid_run_is_one_line(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(steps=4), tmp_path / "run")
    monkeypatch.setattr("selfsup.training.trainer.plan_run", lambda *a, **k: [])
    real = trainer.train_step

    def step(views):
        if trainer.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(views)

    trainer.train_step = step
    with pytest.raises(UserError, match=r"out of memory at step 3 with batch 8 .*lower --batch-size"):
        trainer.fit()


# ----- the collapse watchdog -----

def test_watchdog_warns_once_per_streak_after_patience():
    check = CollapseCheck((("h", 0.9, 1.0),), "uniform", "BN")
    dog = Watchdog([check], patience=3, smoothing=0.0)
    seen = [dog.observe(s, {"h": h}) for s, h in enumerate([0.5, 0.95, 0.96, 0.97, 0.99, 0.5, 0.95], 1)]
    assert [w.step if w else None for w in seen] == [None, None, None, 4, None, None, None]
    assert seen[3].since == 2 and "since step 2" in seen[3].message() and dog.onset == 7


def test_teacher_checks_bound_entropy_near_log_k_and_near_zero():
    uniform, peaked = teacher_checks(np.log(1024))  # log K = 6.93
    assert uniform.holds({"teacher_entropy": 6.8, "kl": 0.05})
    assert not uniform.holds({"teacher_entropy": 6.0, "kl": 0.05})  # peaked enough
    assert not uniform.holds({"teacher_entropy": 6.7, "kl": 0.35})  # flat, but the student still learns
    assert peaked.holds({"teacher_entropy": 0.2, "kl": 0.26}) and not peaked.holds({"teacher_entropy": 1.0, "kl": 0.0})


def no_sharpening(**train) -> Config:
    """The collapse study's DINO without sharpening (tau_t = tau_s; benchmarks/collapse.py): the default recipe at
    patch 7 and lr 1e-3 on mnist5k, which goes uniform (entropy 6.7 of log K = 6.93, KL 0.2 -> 0.05)."""
    cfg = Config()
    load_recipe(cfg, "dino_mnist5k")
    apply(cfg, {"backbone": {"patch_size": 7, "drop_path": 0.1}, "optim": {"lr": 1e-3, "steps": 300},
                "teacher": {"temp": 0.1, "warmup_temp": 0.1}, "eval": {"final": False},
                "data": {"num_workers": 0}, "train": {"threads": 1, "collapse_patience": 30, **train}}, "test")
    return cfg


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory) -> tuple[Path, str]:
    """A run without sharpening that stops when the watchdog fires: (run folder, the exception's message)."""
    out = tmp_path_factory.mktemp("collapse") / "run"
    with pytest.raises(Collapsed) as e:
        Trainer(no_sharpening(stop_on_collapse=True, checkpoint_every=25, keep_last=1), out).fit()
    return out, str(e.value)


def test_dino_without_sharpening_collapses_and_the_watchdog_says_so(collapsed):
    out, message = collapsed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (warning,) = [r for r in rows if r.get("warning") == "collapse"]
    assert warning["monitor"] == "teacher_entropy" and "uniform" in warning["message"]
    assert warning["step"] - warning["since"] + 1 == 30  # held for train.collapse_patience steps
    assert warning["message"] in message and "dino.use_bn=true" in warning["message"]


def test_stop_on_collapse_keeps_the_last_checkpoint_before_it(collapsed):
    out, message = collapsed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warning = next(r for r in rows if r.get("warning") == "collapse")
    assert max(r["step"] for r in rows) == warning["step"]  # stopped there
    kept = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    before = [k for k in kept if int(k[11:19]) < warning["since"]]
    assert before and before[-1] in message and "the last checkpoint before it" in message
    assert not (out / "backbone.safetensors").exists()


def test_the_default_recipe_does_not_trigger_the_watchdog(tmp_path):
    r = selfsup("train", "--steps", "150", "train.collapse_patience=50", "eval.final=false", "--out",
                str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "collapse" not in r.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["collapse_warnings"] == []
