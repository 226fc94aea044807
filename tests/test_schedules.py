"""Each schedule's first, middle and last values, scaling with the run's length, and the trainer building a
method's schedules without knowing their names."""
import math

import numpy as np
import pytest

from selfsup.config import Config
from selfsup.methods.schedule import Progress, Schedule, ramp
from selfsup.training.schedules import Schedules
from tiny import tiny_config


def dino_specs(cfg: Config) -> dict[str, Schedule]:
    from selfsup.methods.dino import DINO

    small = tiny_config()
    small.teacher, small.optim = cfg.teacher, cfg.optim  # the schedules' sections; a small network
    return DINO(small).schedules()


def test_cosine_with_warmup_first_middle_last():
    s = ramp(1.0, 0.0, total=110, warmup=10, warmup_start=0.0)
    assert len(s) == 110
    assert s[0] == 0.0 and s[5] == pytest.approx(0.5)  # linear warm-up
    assert s[10] == pytest.approx(1.0)  # cosine starts at the base value
    assert s[10 + 50] == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 50 / 99))  # half-way down the cosine
    assert s[-1] == 0.0


def test_warmup_then_constant():
    s = ramp(0.07, 0.0, total=100, warmup=30, warmup_start=0.04, shape="constant")
    assert s[0] == pytest.approx(0.04) and s[15] == pytest.approx(0.055) and s[30] == s[-1] == pytest.approx(0.07)


def test_first_epochs_schedule_is_one_then_zero():
    v = Schedule(shape="first", epochs=2).values(10, lambda e: int(e * 3))
    assert v.tolist() == [1.0] * 6 + [0.0] * 4


def test_dino_schedules_scale_with_the_run():
    cfg = Config()  # DINO defaults: warm-up 10 / teacher-temperature warm-up 30 / frozen last layer 1 of 100 epochs
    cfg.optim.batch_size = 512
    s = Schedules.build(cfg, dino_specs(cfg), total_steps=1000, steps_per_epoch=100)  # 10 epochs keep the shape
    lr = 5e-4 * 512 / 256
    assert s.lr[100] == pytest.approx(lr)  # 10 % warm-up: peak at step 100
    assert s.lr[50] == pytest.approx(lr / 2)
    assert s.lr[-1] == pytest.approx(1e-6)
    temp = s.method["teacher_temp"]
    assert temp[0] == pytest.approx(0.04) and temp[300] == pytest.approx(0.07) and temp[150] == pytest.approx(0.055)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4)
    assert s.weight_decay[len(s.weight_decay) // 2] == pytest.approx(0.22, abs=1e-3)
    assert s.method["momentum"][0] == pytest.approx(0.996) and s.method["momentum"][-1] == pytest.approx(1.0)
    assert s.method["freeze_last_layer"].sum() == 10 and s.first_full_step == 10


def test_schedules_equal_a_plain_restatement():
    """DINO's utils.cosine_scheduler and its teacher-temperature schedule, written out step by step."""
    cfg = Config()
    cfg.optim.batch_size, cfg.optim.schedule_epochs = 256, None
    total, per_epoch = 2000, 50
    s = Schedules.build(cfg, dino_specs(cfg), total, per_epoch)
    o, t = cfg.optim, cfg.teacher
    warm, n = int(o.warmup_epochs * per_epoch), total - int(o.warmup_epochs * per_epoch)
    lr = [o.lr * i / warm for i in range(warm)] + [
        o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * i / (n - 1))) for i in range(n)]
    np.testing.assert_allclose(s.lr, lr, rtol=1e-12, atol=1e-15)
    tw = int(t.warmup_temp_epochs * per_epoch)
    temp = [t.warmup_temp + (t.temp - t.warmup_temp) * i / tw for i in range(tw)] + [t.temp] * (total - tw)
    np.testing.assert_allclose(s.method["teacher_temp"], temp, rtol=1e-12)


def test_unscaled_schedules_keep_epoch_counts():
    cfg = Config()
    cfg.optim.schedule_epochs = None
    s = Schedules.build(cfg, dino_specs(cfg), total_steps=5000, steps_per_epoch=100)
    temp = s.method["teacher_temp"]
    assert s.first_full_step == 100 and temp[2999] < 0.07 and temp[3000] == pytest.approx(0.07)


def test_sqrt_lr_scaling():
    cfg = Config()
    cfg.optim.lr_scaling, cfg.optim.lr_base_batch, cfg.optim.lr, cfg.optim.batch_size = "sqrt", 1024, 4e-3, 256
    s = Schedules.build(cfg, {}, total_steps=100, steps_per_epoch=10)
    assert max(s.lr) == pytest.approx(4e-3 * 0.5) and s.method == {} and s.first_full_step == 0


def test_progress_gives_each_declared_value_and_names_the_missing_one():
    p = Progress(7, 4, {"momentum": np.linspace(0.9, 1.0, 11)})
    assert p.epoch == 1.75 and p.momentum == pytest.approx(0.97) and p.values() == {"momentum": p.momentum}
    assert Progress(99, 4, {"momentum": np.linspace(0.9, 1.0, 11)}).momentum == 1.0  # past the end: the last
    with pytest.raises(AttributeError, match="no schedule named 'teacher_temp'"):
        p.teacher_temp
